"""The Storage SCP: which presentation contexts the node accepts, and the C-STORE handler that spools before acking.

Accepted: MR Image, Enhanced MR Image and Legacy Converted Enhanced MR Image Storage, in each transfer
syntax the DICOM reader (preprocess/dicom*.py, pydicom) decodes on this machine (the compressed ones
only where their decoder is installed), and Verification (C-ECHO). Any other SOP class or transfer
syntax is refused at association negotiation and the refusal is logged by the standard names of the
abstract and transfer syntax (never a tag value).

The handler writes the instance as received (its encoded bytes, no re-encoding) to the spool, fsynced,
and only then answers 0x0000; a spool that is full (below --min-free-mb) or fails answers 0xA700 (out of
resources) so that the sender keeps the instance and retries.
"""

from __future__ import annotations

from ..preprocess.dicom_files import quiet_pydicom

MR_STORAGE = ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4")
_CANDIDATE_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
)
STATUS_OK = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
_RESULTS = {0x01: "refused by the node", 0x02: "refused (no reason given)", 0x03: "SOP class not accepted",
            0x04: "no transfer syntax offered that the node decodes"}


def decodable_syntaxes() -> list[str]:
    """The transfer syntaxes pydicom can decode here: uncompressed always, compressed where a decoder is installed."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    out = []
    for ts in _CANDIDATE_SYNTAXES:
        uid = UID(ts)
        if not uid.is_compressed:
            out.append(ts)
            continue
        try:
            if get_decoder(uid).is_available:
                out.append(ts)
        except NotImplementedError:
            pass
    return out


def refused_summary(assoc) -> str | None:
    """One line on what an association's negotiation refused, or None: SOP classes not accepted are counted (a
    sender such as storescu proposes every storage class); an MR class refused for its transfer syntaxes is named
    with them, by their standard names (a UID the dictionary does not know is not logged)."""
    from pydicom.uid import UID

    other, syntax = set(), {}
    for cx in assoc.rejected_contexts:
        if cx.abstract_syntax in MR_STORAGE:
            name = UID(cx.abstract_syntax).name
            for ts in cx.transfer_syntax:
                ts_name = UID(ts).name
                syntax.setdefault(name, set()).add(ts_name if ts_name != ts else "a private transfer syntax")
        else:
            other.add(cx.abstract_syntax)
    if not other and not syntax:
        return None
    parts = []
    if other:
        parts.append(f"{len(other)} SOP class{'es' if len(other) != 1 else ''} not accepted")
    for name, syntaxes in sorted(syntax.items()):
        parts.append(f"{name} in {', '.join(sorted(syntaxes))}: {_RESULTS[0x04]}")
    return "; ".join(parts)


@quiet_pydicom()
def instance_uids(event) -> tuple[str, str, str] | None:
    """(study, series, SOP instance UID) of a received instance, or None if any is missing."""
    try:
        ds = event.dataset
        uids = (ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"),
                ds.get("SOPInstanceUID") or event.request.AffectedSOPInstanceUID)
    except Exception:  # noqa: BLE001 -- an undecodable dataset is refused, not a crash of the association
        return None
    if not all(uids):
        return None
    return tuple(str(u) for u in uids)
