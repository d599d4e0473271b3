"""lm-evaluation-harness on a tuili model in this process (`tuili eval --tasks ...`): no server, no
second copy of the weights. `TuiliLM` is the harness's model interface over tuili's engine: log-
likelihoods from `tuili.engine.pooling.loglikelihood` (one forward per batch of pairs) and greedy
generation from `LLM.generate`, with the harness's own rules for splitting a context from its
continuation, so that scores match its `hf` back end on the same weights.
"""

from __future__ import annotations

from typing import Any

from tuili.engine import LLM, SamplingParams
from tuili.engine.pooling import loglikelihood
from tuili.models.model import Model


def _lm_base() -> type:
    from lm_eval.api.model import LM

    return LM


class TuiliLM(_lm_base()):  # type: ignore[misc]
    """lm-eval's `LM` over a tuili `Model`."""

    def __init__(self, model: Model, batch_size: int = 16, max_gen_toks: int = 256):
        super().__init__()
        self.model, self.batch_size, self.max_gen_toks = model, batch_size, max_gen_toks
        self.tokenizer = model.tokenizer
        self.llm = LLM(model)
        bos = self.tokenizer.bos_token
        # what an empty context starts from: the BOS token, else the end-of-text one (as the hf back end)
        self.prefix = [self.tokenizer.token_id(bos) if bos else sorted(model.eos_token_ids)[0]]

    # ---- the harness's interface -------------------------------------------------------------
    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        pairs = [self._split(*request.args) for request in requests]
        return self._score(pairs)

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        """The whole text's log-likelihood, in windows of the model's context (each after the first
        continues from the tokens before it)."""
        context = self.model.config.max_position_embeddings
        out = []
        for request in requests:
            ids = self.tokenizer.encode(request.args[0], add_special_tokens=False)
            pairs, start = [], 0
            while start < len(ids):
                end = min(len(ids), start + context - 1)
                before = ids[max(0, end - context + 1) : start] or self.prefix
                pairs.append((before[-(context - (end - start)) :], ids[start:end]))
                start = end
            out.append(sum(logprob for logprob, _ in self._score(pairs)))
        return out

    def generate_until(self, requests: list[Any]) -> list[str]:
        prompts, params = [], []
        for request in requests:
            context, options = request.args
            options = dict(options)
            until = options.pop("until", None) or []
            stops = [until] if isinstance(until, str) else list(until)
            params.append(
                SamplingParams(
                    max_tokens=int(options.pop("max_gen_toks", self.max_gen_toks)),
                    temperature=float(options.pop("temperature", 0.0)),
                    stop=tuple(stops),
                )
            )
            prompts.append(self.tokenizer.encode(context, add_special_tokens=False) or self.prefix)
        return [done.outputs[0].text for done in self.llm.generate(prompts, params)]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self.model.source

    # ---- helpers -------------------------------------------------------------------------------
    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """As the harness's hf back end splits them: trailing spaces of the context go with the
        continuation, the whole is encoded once, and the continuation is what follows the context."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation, add_special_tokens=False)
        head = self.tokenizer.encode(context, add_special_tokens=False)
        return (head or self.prefix), whole[len(head) :]

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        scores = []
        for i in range(0, len(pairs), self.batch_size):
            scores += loglikelihood(self.model, pairs[i : i + self.batch_size])
        return [(score.logprob, score.is_greedy) for score in scores]


def evaluate(
    model: Model, tasks: list[str], include_path: str | None = None, limit: float | None = None, **options: Any
) -> dict:
    """lm-eval's results for `tasks` on `model` (simple_evaluate's dict)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    return lm_eval.simple_evaluate(model=TuiliLM(model), tasks=tasks, task_manager=manager, limit=limit, **options)
