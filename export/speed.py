"""What a mix of formats costs in time: the LLM backend's classify (prefill + the answers scored) and decode-step
times on the first evaluation case, best of a few repeats (export-time figures on the exporting machine; the
benchmark suites time the shipped bundle properly)."""

from __future__ import annotations

import time

DECODE_TOKENS = 8
REPEATS = 3


def llm_times(llm, ref) -> dict:
    """-> {"classify_ms", "decode_step_ms"}: prefill + scoring of the three answers, and one greedy decode step
    (mean over DECODE_TOKENS), each the best of REPEATS."""
    tasks = ref.tasks
    i, text = ref.cases[0]
    visual, prompt = ref.visual[i:i + 1], tasks.prompt_ids(text)
    classify, step = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        state = llm.prefill(prompt, visual)
        llm.candidate_logits(state, tasks.answer_ids)
        t1 = time.perf_counter()
        state = llm.prefill(prompt, visual)
        tok = int(state.next_logits.argmax())
        t2 = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            tok = int(llm.step(state, tok).argmax())
        step.append((time.perf_counter() - t2) / DECODE_TOKENS)
        classify.append(t1 - t0)
    return {"classify_ms": round(1e3 * min(classify), 3), "decode_step_ms": round(1e3 * min(step), 3)}
