"""The local generation backend: batched generation and scoring on a VLM loaded in this process.

Two properties matter more than raw speed here:

* **Sampling is a pure function of the request** (`capdpo.generation.sampling`): a description does not depend on
  which other requests shared its batch, on a crash and resume, on the batch size or on the number of GPUs.
* **Scores come from one forward pass.** `forward_logprobs` returns the next-token log-probabilities at the
  end of the prompt and along an optional continuation (teacher forcing); validators read P(yes), rating
  digits or A/B from them without sampling. `score` runs each image's shared prefix once
  (`capdpo.generation.prefix`) when asked.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from capdpo.generation.batching import Batcher, Output, Request, plan_batches, run_halving
from capdpo.generation.prefix import SharedPrefixScorer, forward_logprobs
from capdpo.generation.sampling import Generation, SeededSampler
from capdpo.generation.static_decoder import StaticDecoder
from capdpo.models.loading import LoadedModel


class Engine:
    """The `local` backend: `plan`, `generate`, `score` and `forward_logprobs` on one VLM loaded in this process."""

    def __init__(
        self,
        lm: LoadedModel,
        decoder: str = "static",
        prefill_rows: int = 0,
        window_step: int = 0,
        decode_kernel: bool = True,
        shared_prefix: bool = True,
        images_per_pass: int = 32,
        share_prompts: bool = True,
    ) -> None:
        """`decoder`: "static" (capdpo's static-cache loop, CUDA graphs on GPU) or "hf" (`model.generate`).
        `prefill_rows`: rows per prefill forward of the static decoder (0: the whole batch at once); `window_step`:
        its decode attention window's growth (0: the whole cache; see `StaticDecoder`); `decode_kernel`: its decode
        steps may attend through capdpo's kernel over the written cache slots (where it runs: CUDA with Triton).
        `shared_prefix`: `score` runs each image's common prefix once, for `images_per_pass` images per forward.
        `share_prompts`: requests of one batch with the same image and messages (stage 3's k variants of a sentence,
        stage 2's samples of an image) share one prefill in the static decoder, then sample apart."""
        self.lm = lm
        self.batcher = Batcher(lm)
        self.eos_ids = lm.end_of_turn_ids()
        self.static = (
            StaticDecoder(
                lm, prefill_rows=prefill_rows, window_step=window_step, decode_kernel=None if decode_kernel else False
            )
            if decoder == "static"
            else None
        )
        self.share_prompts = share_prompts and self.static is not None
        self.shared_prefix = shared_prefix
        self.images_per_pass = images_per_pass
        self._scorer: SharedPrefixScorer | None = None
        self._worker: Any = None  # one thread that tokenises batches ahead (`prepare`)
        self._prepared: dict[tuple[str, ...], Any] = {}

    def prepare(self, batch: Sequence[Request]) -> None:
        """Start tokenising `batch` (chat template, image loading and processing) in a worker thread, so that a
        later `generate(batch)` finds its inputs ready instead of leaving the GPU idle while the host prepares them.
        Batches are prepared one after another, in the order asked."""
        from concurrent.futures import ThreadPoolExecutor

        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="capdpo-prepare")
        prompts, _ = self._prompts(batch)
        self._prepared[tuple(r.key for r in batch)] = self._worker.submit(self.batcher.encode, prompts)

    def _prompts(self, batch: Sequence[Request]) -> tuple[list[Request], list[int] | None]:
        """The requests whose prompts `batch` needs (each distinct image + messages + continuation once, when prompts
        are shared), and for each request of `batch` the index of its prompt (None: one prompt per request)."""
        if not self.share_prompts:
            return list(batch), None
        index: dict[str, int] = {}
        prompts, rows = [], []
        for request in batch:
            key = json.dumps([request.image, request.messages, request.continuation], sort_keys=True, default=str)
            if key not in index:
                index[key] = len(prompts)
                prompts.append(request)
            rows.append(index[key])
        return (list(batch), None) if len(prompts) == len(batch) else (prompts, rows)

    def _inputs(self, batch: Sequence[Request], prompts: Sequence[Request]) -> dict[str, Any]:
        """The model inputs of the batch's prompts (`_prompts`): prepared ahead if asked for, else now (after any
        preparation under way, so the processor is never used by two threads at once)."""
        ready = self._prepared.pop(tuple(r.key for r in batch), None)
        if ready is not None:
            return ready.result()
        for pending in list(self._prepared.values()):
            pending.exception()  # waits; a failure is raised where that batch is used
        return self.batcher.encode(prompts)

    def plan(self, requests: Sequence[Request], batch_size: int) -> list[list[Request]]:
        """Batches of requests of similar length, in an order fixed by the requests alone."""
        return plan_batches(requests, batch_size)

    def generate(self, batch: Sequence[Request], gen: Generation) -> list[Output]:
        """Generate for one batch (halving on OOM); outputs are in the batch's order."""
        return run_halving(batch, lambda b: self._generate(b, gen))

    def _generate(self, batch: Sequence[Request], gen: Generation) -> list[Output]:
        import torch
        from transformers import LogitsProcessorList

        prompts, rows = self._prompts(batch)
        inputs = self._inputs(batch, prompts)
        prompt_length = inputs["input_ids"].shape[1]
        if self.static is not None:
            pad = self.lm.tokenizer.pad_token_id
            rows_t = torch.tensor(rows, dtype=torch.long) if rows is not None else None
            generated = self.static.generate(inputs, gen, [r.seed for r in batch], self.eos_ids, pad, rows=rows_t)
            return self._outputs(batch, generated.tolist())
        kwargs: dict[str, Any] = dict(
            max_new_tokens=gen.max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_ids,
            pad_token_id=self.lm.tokenizer.pad_token_id,
            repetition_penalty=gen.repetition_penalty if gen.repetition_penalty != 1.0 else None,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        if gen.temperature > 0:
            sampler = SeededSampler([r.seed for r in batch], prompt_length, gen, self.lm.device)
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
        with torch.inference_mode():
            out = self.lm.model.generate(**inputs, **kwargs)
        return self._outputs(batch, out[:, prompt_length:].tolist())

    def _outputs(self, batch: Sequence[Request], rows: list[list[int]]) -> list[Output]:
        outputs = []
        for request, row in zip(batch, rows):
            finish = "length"
            for i, token in enumerate(row):
                if token in self.eos_ids:
                    row, finish = row[:i], "stop"
                    break
            text = self.lm.tokenizer.decode(row, skip_special_tokens=True)
            outputs.append(Output(key=request.key, text=text.strip(), token_ids=row, finish_reason=finish))
        return outputs

    # ---- scoring ----------------------------------------------------------------------------------------------
    def forward_logprobs(self, batch: Sequence[Request], keep: Sequence[int] | None = None) -> list[Any]:
        """Log-probabilities [len(continuation) + 1, vocab] per request: at the prompt's end and after each
        continuation token (one forward pass, teacher forcing); with `keep`, at those vocabulary ids only
        (`capdpo.generation.prefix.PickedLogprobs`). Halves on OOM."""
        self._release_decoder()
        return run_halving(batch, lambda b: forward_logprobs(self.lm, self.batcher, b, keep))

    def _release_decoder(self) -> None:
        if self.static is not None:
            self.static.release()  # the decoder's kept cache and graphs are not needed while scoring

    def score(
        self,
        requests: Sequence[Request],
        batch_size: int,
        shared_prefix: bool | None = None,
        keep: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        """{request key: log-probs [len(continuation) + 1, vocab]} for every request; with `shared_prefix` the
        requests of one image share their common prefix's forward pass (the same numbers, much faster; default:
        the engine's `shared_prefix`); with `keep`, only the log-probs at those vocabulary ids leave the GPU."""
        self._release_decoder()
        if self.shared_prefix if shared_prefix is None else shared_prefix:
            if self._scorer is None:
                self._scorer = SharedPrefixScorer(self.lm, self.batcher, self.images_per_pass)
            return self._scorer.score(requests, batch_size, keep)
        results: dict[str, Any] = {}
        for batch in self.plan(requests, batch_size):
            results.update({r.key: lp for r, lp in zip(batch, self.forward_logprobs(batch, keep))})
        return results
