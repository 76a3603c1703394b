"""medblip-node: a DICOM node that takes studies from a PACS and sends the result back as a structured report."""
