"""How many prompt tokens a step may carry beside the decodes, so that decoding streams keep pace.

Every decoding stream waits for the whole step, so a step that also prefills a 500-token chunk
stalls them all for that chunk (an inter-token latency spike). As in Sarathi-Serve's stall-free
batching, prefill is cut into chunks that fit a per-step time target: `StepPacer` learns what a
step costs from the steps it has timed (a decode-only step's time, and the time each prompt token
adds) and gives prefill the tokens that keep a step within `target_itl` seconds. Prefill always gets
at least `min_prefill_tokens`, so new requests progress however slow decoding is, and the whole
token budget when nothing decodes (nobody waits). `target_itl=None` turns pacing off: every step
takes up to max_num_batched_tokens (throughput first, as before).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TARGET_ITL = 0.05  # seconds


@dataclass
class StepPacer:
    """target_itl: seconds a step with decodes in it should take (None: no pacing).
    min_prefill_tokens: prompt tokens a step carries however long its decodes take.
    smoothing: weight of the newest timing in the running estimates."""

    target_itl: float | None = DEFAULT_TARGET_ITL
    min_prefill_tokens: int = 32
    smoothing: float = 0.25
    decode_time: float | None = None  # seconds of a decode-only step, recent steps weighted most
    token_time: float | None = None  # seconds one prompt token adds to a step

    def __post_init__(self) -> None:
        if self.target_itl is not None and not self.target_itl > 0:
            raise ValueError(f"target_itl must be a positive number of seconds (or None), got {self.target_itl}")
        if self.min_prefill_tokens < 1:
            raise ValueError(f"min_prefill_tokens must be at least 1, got {self.min_prefill_tokens}")

    def prefill_budget(self, decodes: int, budget: int) -> int:
        """Prompt tokens the next step may take beside `decodes` decoding streams, of `budget` left."""
        if self.target_itl is None or decodes == 0:
            return budget
        floor = min(budget, self.min_prefill_tokens)
        if self.token_time is None:
            return floor  # nothing timed yet: a small chunk first, to learn from
        spare = self.target_itl - (self.decode_time or 0.0)
        return max(floor, min(budget, int(spare / self.token_time)))

    def observe(self, decodes: int, prefill: int, seconds: float) -> None:
        """A step of `decodes` one-token chunks and `prefill` prompt tokens took `seconds`."""
        if prefill == 0:
            self.decode_time = self._blend(self.decode_time, seconds)
            return
        if prefill < self.min_prefill_tokens:
            return  # a short prompt's step is mostly fixed cost: it would overstate a token's
        base = self.decode_time if decodes and self.decode_time is not None else 0.0
        self.token_time = self._blend(self.token_time, max(seconds - base, 0.0) / prefill)

    def _blend(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)
