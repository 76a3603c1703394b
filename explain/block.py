"""The row's `explanation` block: method, target, files, peak in world mm, the image / text shares, the
patient-text tokens that mattered most (positions and shares; their text only where the caller asks, never in
logs), and the resolution the map really has."""

from __future__ import annotations

import numpy as np


def peak_of(map_ijk: np.ndarray, affine: np.ndarray) -> dict | None:
    """The map's largest voxel (nibabel order) and where it lies in RAS+ mm; None for a map with nothing in it
    (e.g. occlusion where no patch lowers the margin)."""
    if not float(map_ijk.max()) > 0:
        return None
    ijk = np.unravel_index(int(np.argmax(map_ijk)), map_ijk.shape)[:3]
    world = affine @ np.array([*ijk, 1.0])
    return {"voxel": [int(v) for v in ijk], "world_mm": [round(float(v), 2) for v in world[:3]], "space": "RAS+"}


def shares(llm_inputs: np.ndarray, n_prompt: int, n_text: int) -> dict:
    """Relevance over the LLM's inputs -> shares of the scan's visual tokens, the patient text and the question."""
    total = float(llm_inputs.sum()) or 1.0
    image = float(llm_inputs[n_prompt:].sum())
    text = float(llm_inputs[:n_text].sum())
    return {"image": round(image / total, 4), "patient_text": round(text / total, 4),
            "question": round((total - image - text) / total, 4)}


def top_text_tokens(llm_inputs: np.ndarray, text_ids: list[int], tokenizer=None, k: int = 5) -> list[dict]:
    """The k patient-text tokens with the most relevance: position, share of the text's relevance, and the token's
    text only when a tokenizer is given (the caller decides whether text may be written)."""
    rel = llm_inputs[: len(text_ids)]
    total = float(rel.sum()) or 1.0
    out = []
    for pos in np.argsort(-rel)[:k]:
        item = {"position": int(pos), "share": round(float(rel[pos]) / total, 4)}
        if tokenizer is not None:
            item["token"] = tokenizer.decode([text_ids[pos]])
        out.append(item)
    return out


def resolution_note(grid, spacing_xyz, refined: bool, method: str) -> str:
    g = grid.size // grid.patch
    mm = grid.resolution_mm(spacing_xyz)
    inside = ("refined inside each token by gradient x (input - its local mean): finer detail is the gradient's, "
              "not the attention's" if refined else "one value per token, not refined")
    how = "occlusion of each token" if method == "occlusion" else "attention relevance"
    return (f"{how} on {g}x{g}x{g} tokens of {grid.patch} model voxels; one token spans "
            f"{mm[0]:.1f} x {mm[1]:.1f} x {mm[2]:.1f} mm (x, y, z) of this scan; {inside}")
