"""Engine: owns the model(s), the paged KV cache(s) and the scheduler; `embed()` is the public door.

`embed(items)` validates every item first (bad items raise, or become error rows), then feeds
all sequences to the scheduler and steps until each one has its embedding. Servers use the
same machinery one level down: `add_request()` and `step()`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .cache import BlockManager, allocate_cache, blocks_in, bytes_per_block, cache_budget_bytes
from .checkpoint import check_checkpoint_files, fingerprint, resolve_checkpoint
from .config import EngineConfig, ModelConfig, TTEConfig, read_json_object
from .engine_dir import EngineDir, is_engine_dir
from .errors import Cancelled, CapacityError, CheckpointError, InvalidInputError, ModelOutputError, describe, one_line
from .host_memory import keep_freed_memory
from .inputs import PromptBuilder, Query, as_query, check_settings
from .prep import prepare_all, run_prepared
from .model.cpu_linear import pack_linears
from .model.loader import CheckedWeights, build_model, check_weights_fit, load_checkpoint_weights
from .model.rope import prompt_positions
from .runner import ENCODER_CACHE_TOKENS, Runner, step_loop_mode
from .sampling import SamplingParams
from .scheduler import SUFFIX_WAIT_WITH_GRAPHS, Scheduler
from .sequence import Sequence
from .vision import ImageProcessorConfig

logger = logging.getLogger("tte_engine")


@dataclass
class EmbedResult:
    """What `Engine.embed` returns; row i of every field belongs to items[i]."""

    embeddings: torch.Tensor  # [N, D] float32, L2-normalized; NaN rows for failed items
    traces: list[str]
    prompt_token_ids: list[list[int]]
    trace_token_ids: list[list[int]]
    embed_token_ids: list[list[int]]
    errors: list[str | None]
    usage: dict[str, int] = field(default_factory=dict)
    stop_reasons: list[str | None] = field(default_factory=list)


def _resolve_dtype(dtype: str, device: torch.device, cfg: ModelConfig) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if cfg.torch_dtype in ("float32", "bfloat16") else getattr(torch, cfg.torch_dtype)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return getattr(torch, dtype)


@dataclass
class _Stage:
    """One model with its cache: the unified model, or the reasoner / embedder of a two-model pair."""

    checkpoint: Path
    model_cfg: ModelConfig
    runner: Runner
    blocks: BlockManager


class Engine:
    """A Think-Then-Embed engine over one checkpoint (unified) or a reasoner/embedder pair."""

    def __init__(
        self,
        checkpoint: str | Path = "tiny-random",
        *,
        device: str | None = None,
        dtype: str | None = None,
        config: EngineConfig | None = None,
        **overrides: Any,
    ):
        """device: "cpu" (default) or "cuda[:i]"; dtype: "auto" (default), "float32", "bfloat16", "float16";
        any other EngineConfig field can be passed as a keyword (cache_memory=, max_num_seqs=, ...)."""
        given = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.config = replace(config or EngineConfig(), **given, **overrides)
        self.config.check()
        self.device = torch.device(self.config.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # activations reuse heap memory instead of fresh pages every op
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.config.device!r} was asked for, but this torch build sees no CUDA device "
                             f"(torch {torch.__version__}); use the cpu device (--device cpu on the command line) or install a CUDA build of torch")
        self.checkpoint = resolve_checkpoint(checkpoint)
        # an exported engine directory (engine.json) carries its configs and runtime-layout weights
        self.engine_dir = EngineDir.open(self.checkpoint) if is_engine_dir(self.checkpoint) else None
        self.tte = self.engine_dir.tte if self.engine_dir else TTEConfig.load(self.checkpoint)
        if not self.tte.normalize:
            raise CheckpointError(f"{self.checkpoint}: normalize=false is not supported (embeddings are always L2-normalized)")
        self.model_cfg = self.engine_dir.model_cfg if self.engine_dir else ModelConfig.from_hf(read_json_object(self.checkpoint / "config.json", required=True),
                                                                                                 source=str(self.checkpoint / "config.json"))
        self.dtype = _resolve_dtype(self.config.dtype, self.device, self.model_cfg)
        self.max_model_len = min(self.config.max_model_len or self.model_cfg.text.max_position_embeddings, self.model_cfg.text.max_position_embeddings)

        from transformers import AutoTokenizer

        check_checkpoint_files(self.checkpoint)  # tokenizer and preprocessor files: one CheckpointError, not transformers' traceback
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint)
            self.image_cfg = ImageProcessorConfig.load(self.checkpoint)
            self.prompts = PromptBuilder(self.checkpoint, self.tokenizer, self.tte, self.model_cfg, self.image_cfg)
            shortest = len(self.prompts.build(as_query("a", 0), 0, think=False, instruction="").token_ids)  # the template renders
        except CheckpointError:
            raise
        except Exception as exc:  # a corrupt tokenizer.json / tokenizer_config.json, a chat template that does not render, ...
            raise CheckpointError(f"{self.checkpoint}: cannot build prompts from its tokenizer files and chat template "
                                  f"({one_line(describe(exc))})") from exc
        if self.engine_dir:
            self.engine_dir.check_tokens(self.prompts)
        self._shortest_item_tokens = shortest + self.prompts.closing_tokens  # what every KV cache must hold too (`_make_stage`)
        self._check_model_len()

        stage_dirs = [self.checkpoint]
        if self.tte.mode == "two_model":
            stage_dirs.insert(0, self._reasoner_dir())
        checked = [self._check_stage(d, embedder=(d == self.checkpoint)) for d in stage_dirs]  # every checkpoint, before any model is built
        models = [self._load_model(d, cfg, weights, embedder=(d == self.checkpoint)) for d, (cfg, weights) in zip(stage_dirs, checked)]
        share = cache_budget_bytes(self.config.cache_memory, self.device) // len(models)  # two models split the cache
        self.stages = [self._make_stage(d, m, share) for d, m in zip(stage_dirs, models)]
        self.last_step_size = 0  # sequences the last step() ran
        self._loop_lock = threading.Lock()  # held by the thread running a loop of steps (`claim_loop`)
        self._loop_owner: int | None = None
        self.failed_step_seqs: list[Sequence] | None = None  # the sequences of the last step() that raised (see step)
        self.scheduler = Scheduler(
            [s.blocks for s in self.stages],
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            stop_sequences=self.prompts.stop_sequences,
            vision_token_ids=(self.model_cfg.image_token_id, self.model_cfg.video_token_id),
            suffix_wait_steps=self.config.suffix_wait_steps if self.config.suffix_wait_steps is not None
            else SUFFIX_WAIT_WITH_GRAPHS if self.stages[-1].runner.graphs is not None else 0,
        )
        logger.info("loaded %s (%s, %s head) on %s in %s", self.checkpoint, self.tte.mode, self.tte.head.type, self.device, self.dtype)

    def __repr__(self) -> str:
        graphs = "on" if self.stages[-1].runner.graphs is not None else "off"
        return (f"Engine({str(self.checkpoint)!r}, {self.tte.mode}, {self.tte.head.type} head, device={self.device}, "
                f"dtype={str(self.dtype).removeprefix('torch.')}, embedding_dim={self.embedding_dim}, max_model_len={self.max_model_len}, "
                f"max_num_seqs={self.config.max_num_seqs}, cuda_graphs={graphs})")

    # ------------------------------------------------------------------ loading
    def _check_model_len(self) -> None:
        """Refuse a max_model_len that no item can fit (every request would fail, one by one): the
        shortest prompt (a one-word text, no instruction, no thinking) and the tokens that must
        follow any prompt (think end, embed suffix) must fit. Raises ValueError."""
        tail = self.prompts.closing_tokens
        shortest = self._shortest_item_tokens - tail
        if shortest + tail > self.max_model_len:
            raise ValueError(f"max_model_len {self.max_model_len} holds no item: the shortest prompt (a one-word text, no instruction, "
                             f"no thinking: {shortest} tokens) and the {tail} tokens that must follow any prompt (think end, embed "
                             f"suffix) take {shortest + tail}")

    def _reasoner_dir(self) -> Path:
        ref = Path(self.tte.reasoner)
        path = resolve_checkpoint(self.checkpoint / ref if not ref.is_absolute() and (self.checkpoint / ref).is_dir() else self.tte.reasoner)
        from transformers import AutoTokenizer

        check_checkpoint_files(path)
        if AutoTokenizer.from_pretrained(path).get_vocab() != self.tokenizer.get_vocab():
            raise CheckpointError(f"two_model: the reasoner {path} must share the embedder's tokenizer")
        if ImageProcessorConfig.load(path) != self.image_cfg:
            raise CheckpointError(f"two_model: the reasoner {path} must share the embedder's image preprocessing")
        return path

    def _head_cfg(self, embedder: bool):
        return self.tte.head if embedder else replace(self.tte.head, type="last_token")

    def _check_stage(self, checkpoint: Path, embedder: bool) -> tuple[ModelConfig, CheckedWeights | None]:
        """A stage's model config, checked against its weights' headers (cheap: no tensor data is read), so
        that a config the files do not hold fails before a model of its size is allocated (`check_weights_fit`,
        `EngineDir.check_depths`); and those weights as checked (None for an engine directory's)."""
        cfg = self.model_cfg if checkpoint == self.checkpoint else ModelConfig.from_hf(read_json_object(checkpoint / "config.json", required=True), source=str(checkpoint / "config.json"))
        if (cfg.image_token_id, cfg.vision_start_token_id) != (self.model_cfg.image_token_id, self.model_cfg.vision_start_token_id):
            raise CheckpointError(f"{checkpoint}: its vision token ids differ from the embedder's")
        if self.engine_dir and checkpoint == self.checkpoint:
            self.engine_dir.check_depths(self._head_cfg(embedder))
            return cfg, None
        return cfg, check_weights_fit(cfg, checkpoint, self._head_cfg(embedder))

    def _load_model(self, checkpoint: Path, cfg: ModelConfig, weights: CheckedWeights | None, embedder: bool):
        head_cfg = self._head_cfg(embedder)
        if weights is None:  # the engine directory
            model = self.engine_dir.load_model(head_cfg, dtype=self.dtype, device=self.config.device, max_positions=self.max_model_len, impl=self.config.impl)
        else:
            model = build_model(cfg, head_cfg, dtype=self.dtype, device=self.config.device, max_positions=self.max_model_len, impl=self.config.impl)
            load_checkpoint_weights(model, weights, head_cfg)
            model.finalize()
        if self.config.prepack_weights is not False and self.device.type == "cpu":
            pack_linears(model)
        return model

    def _make_stage(self, checkpoint: Path, model, budget_bytes: int) -> _Stage:
        """Give a loaded model its KV cache (and the mhsa head's source-state cache) and a runner."""
        cfg, with_hidden = model.cfg, model.head is not None
        per_block = bytes_per_block(cfg, self.config.block_size, self.dtype, with_hidden)
        num_blocks = blocks_in(budget_bytes, per_block)
        if num_blocks * self.config.block_size < self._shortest_item_tokens:  # every item would fail, one by one
            raise CapacityError(f"a KV cache of {budget_bytes} bytes holds {num_blocks} blocks of {self.config.block_size} tokens: "
                                f"fewer than the shortest item's {self._shortest_item_tokens} tokens (raise cache_memory to at least "
                                f"{(-(-self._shortest_item_tokens // self.config.block_size) + 1) * per_block} bytes)")
        if num_blocks * self.config.block_size < self.max_model_len:  # vLLM refuses this; here items that fit still run
            warnings.warn(f"{checkpoint.name}: the KV cache holds {num_blocks * self.config.block_size} tokens, fewer than max_model_len "
                          f"{self.max_model_len}: a longer item fails alone (raise cache_memory, or lower max_model_len)", RuntimeWarning, stacklevel=2)
        cache = allocate_cache(cfg, num_blocks, self.config.block_size, self.dtype, self.device, with_hidden)
        max_blocks_per_seq = -(-self.max_model_len // self.config.block_size)
        blocks = BlockManager(num_blocks, self.config.block_size, self.config.max_num_seqs, max_blocks_per_seq,
                              enable_prefix_caching=self.config.enable_prefix_caching)
        graphs = self.config.cuda_graphs if self.config.cuda_graphs is not None else self.device.type == "cuda"
        # a reasoner with more rows than the embedder (Qwen2-VL-7B's 152064 beside 2B's 151936) never
        # generates an id the embedder cannot read: the extra rows are padding, not tokens
        suppressed = self.prompts.suppressed_ids + list(range(self.model_cfg.text.vocab_size, cfg.text.vocab_size))
        runner = Runner(model, cache, blocks, suppressed, self.config.max_vision_patches, cuda_graphs=graphs,
                        encoder_cache_tokens=ENCODER_CACHE_TOKENS if self.config.enable_prefix_caching else 0)
        logger.info("%s: KV cache of %d blocks x %d tokens (%.1f MiB)", checkpoint.name, num_blocks, self.config.block_size, num_blocks * per_block / 2**20)
        return _Stage(checkpoint, cfg, runner, blocks)

    @property
    def embedding_dim(self) -> int:
        return self.model_cfg.text.hidden_size

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies what this engine computes (weights, configs, dtype): a key for result caches."""
        parts = [fingerprint(s.checkpoint) for s in self.stages] + [str(self.dtype)]
        return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()

    # ------------------------------------------------------------------ requests
    def make_sequence(
        self,
        item: Any,
        index: int = 0,
        *,
        think: bool = True,
        max_trace_tokens: int | None = None,
        instruction: str | None = None,
        sampling: SamplingParams | None = None,
        embed: bool = True,
        tag: object = None,
        truncate_prompt_tokens: int | None = None,
    ) -> Sequence:
        """Validate and tokenize one item into a Sequence for `add_request`.

        Cheap checks run first: field types and character counts before any tokenizing or image
        decoding, the token count before rotary positions. `truncate_prompt_tokens`: cut the end of the item's
        text so its prompt holds at most that many tokens (-1: as many as fit the model with the
        trace budget, or with none when the budget is larger than the model; a supplied trace is
        always kept whole), never refusing an item that fits untruncated; None (default): a
        prompt that does not fit is an error.
        Raises InvalidInputError naming `index` for whatever goes wrong while preparing the item
        (bad field, undecodable image, too long, a tokenizer error, ...), never another exception
        (but Cancelled inside `video.stop_decoding_when` once its event is set).
        """
        check_settings(think, max_trace_tokens, instruction, sampling, truncate_prompt_tokens, index)
        budget = self.tte.think.max_tokens if max_trace_tokens is None else max_trace_tokens
        try:
            query = as_query(item, index)
            fit = self.max_model_len - self.prompts.closing_tokens  # the most a prompt (and a given trace) may take
            # against the whole model: a supplied trace is checked once, here, not again against what it leaves the prompt
            self.prompts.check_size(query, instruction, fit, index, text=truncate_prompt_tokens is None)
            cut_to = None
            if truncate_prompt_tokens is not None:
                # a supplied trace must fit beside the prompt (a string one counted in tokens); N caps the prompt
                # alone; -1 leaves room for the trace budget as well, where the model has that room
                if query.trace is not None:  # tokenized once: the builds below take the ids
                    query = replace(query, trace=self.prompts.trace_ids(query.trace, index))
                room = fit - (len(query.trace) if query.trace is not None else 0)
                budget_room = room - (budget if think and query.trace is None else 0)
                cut_to = max(1, room if truncate_prompt_tokens == -1 else min(room, truncate_prompt_tokens))
                fit = budget_room if truncate_prompt_tokens == -1 and budget_room > 0 else cut_to
                if query.text is not None:  # a prefix this long already holds more than `fit` tokens
                    query = replace(query, text=query.text[: cut_to * self.prompts.max_token_chars])
            prompt = self.prompts.build(query, index, think=think, instruction=instruction, max_tokens=fit if cut_to is None else cut_to)
            if truncate_prompt_tokens is not None:
                try:
                    prompt = self.prompts.truncate(query, prompt, fit, index, think=think, instruction=instruction)
                except InvalidInputError:
                    if fit >= cut_to:
                        raise
                    # the trace budget leaves the prompt too little: cut to what fits the model, as an item that
                    # fits untruncated does, and the trace gets the room that is left
                    prompt = self.prompts.truncate(query, prompt, cut_to, index, think=think, instruction=instruction)
            return self._sequence(prompt, None, None, index, budget=budget, think=think, sampling=sampling or SamplingParams(), embed=embed, tag=tag)
        except (InvalidInputError, Cancelled):  # Cancelled: its requester is gone (see video.stop_decoding_when)
            raise
        except Exception as exc:  # whatever goes wrong while preparing one item is that item's error
            raise InvalidInputError(f"cannot prepare this item ({describe(exc)})", index) from exc

    def with_trace(self, seq: Sequence, trace_ids: list[int], index: int = 0) -> Sequence:
        """`seq` (not run yet) with a supplied trace instead of a generated one; reuses its prompt,
        image and positions, so nothing is decoded or tokenized again (result caches use this).
        Raises InvalidInputError for think=False or trace ids a trace may not hold (see
        `PromptBuilder.trace_ids`)."""
        if not seq.think:
            raise InvalidInputError("a trace was supplied but think=False", index)
        prompt = replace(seq.prompt, given_trace_ids=self.prompts.trace_ids(list(trace_ids), index))
        return self._sequence(prompt, seq.positions, seq.rope_delta, index, budget=seq.max_trace_tokens, think=True, sampling=seq.sampling, embed=seq.embed, tag=seq.tag)

    def _sequence(self, prompt, positions, rope_delta, index, *, budget, think, sampling, embed, tag) -> Sequence:
        """A Sequence for a built prompt, once it is known to fit the model and the cache
        (positions None: computed here, after the length check)."""
        tail = self.prompts.closing_tokens + len(prompt.given_trace_ids or [])
        room = self.max_model_len - len(prompt.token_ids) - tail
        if room < 0:
            raise InvalidInputError(
                f"prompt of {len(prompt.token_ids)} tokens, with the {tail} tokens that must follow it (think end, embed suffix"
                f"{', given trace' if prompt.given_trace_ids else ''}), exceeds the model limit of {self.max_model_len} tokens", index
            )
        if positions is None:
            grids = [i.grid_thw for i in prompt.images]
            positions, rope_delta = prompt_positions(prompt.token_ids, grids, (self.model_cfg.image_token_id, self.model_cfg.video_token_id), self.model_cfg.vision.spatial_merge_size)
        seq = Sequence(
            prompt=prompt,
            positions=positions,
            rope_delta=rope_delta,
            max_trace_tokens=min(budget, room) if think else 0,
            suffix_ids=self.prompts.suffix_ids,
            think_end_ids=self.prompts.think_end_ids,
            sampling=sampling,
            think=think,
            embed=embed,
            tag=tag,
        )
        need = self.scheduler.fits_ever(seq)
        if need is not None:
            capacity = min(s.blocks.capacity_tokens for s in self.stages)
            raise InvalidInputError(f"needs up to {need} tokens of KV cache but the cache holds {capacity}; raise cache_memory", index)
        return seq

    def add_request(self, seq: Sequence) -> None:
        """Queue a sequence made by `make_sequence` (from the thread running the engine's loop, if one is)."""
        self._check_owner()
        self.scheduler.add(seq)

    def _check_owner(self) -> None:
        """Raise RuntimeError when another thread holds the engine's loop (`claim_loop`)."""
        if self._loop_owner is not None and self._loop_owner != threading.get_ident():
            raise RuntimeError(_BUSY)

    def step(self) -> list[Sequence]:
        """Run one scheduler step; returns the sequences that finished in it. `last_step_size` is
        then how many sequences it ran (0: there was nothing to run).

        Mid-trace, a decoding sequence's `trace_ids`, `token_ids` and `num_computed` may lag
        behind the steps run (the hot path records tokens as arrays); `scheduler.flush()` brings
        them up to date. Finished and aborted sequences are always up to date.

        A step runs in torch's inference mode, entering it if the caller has not: a loop of steps
        may enter it once around the loop (`with torch.inference_mode():`, as `embed` does), which
        saves the guard's few microseconds a step.

        If scheduling or running the step raises, what it left half done is undone before the
        exception propagates (`Scheduler.step_failed`, `Runner.resync_tables`): the next step
        retries its work, and aborting any of its sequences leaves the others correct.
        `failed_step_seqs` then lists the sequences the step ran (None: it failed before it had
        any), so a server can fail those requests alone."""
        self._check_owner()
        self.last_step_size, self.failed_step_seqs = 0, None
        step = None
        try:
            step = self.scheduler.schedule()
            if step is None:
                return []
            tokens, embeddings = self.stages[step.stage].runner.run(step)
        except BaseException:
            self.failed_step_seqs = list(step.seqs) if step is not None else None
            self.scheduler.step_failed()
            for stage in self.stages:
                stage.runner.resync_tables()
            raise
        self.last_step_size = len(step.seqs)
        return self.scheduler.update(step, tokens, embeddings)

    def reset_prefix_cache(self) -> None:
        """Drop the prefix cache's unused entries and the kept vision-tower outputs (e.g. before timing
        a cold run); results do not change."""
        for stage in self.stages:
            stage.blocks.reset_prefix_cache()
            stage.runner.encoder_cache.clear()

    def abort(self, seq: Sequence) -> bool:
        """Drop a request (a server whose client went away, or whose step failed); frees its cache."""
        return self.scheduler.abort(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @contextlib.contextmanager
    def claim_loop(self):
        """Run a loop of steps on an idle engine, this thread alone: `run`, `embed` and
        `generate_traces` hold it, and tte-serve's loop thread for as long as it serves; meanwhile
        the same call from another thread, or from inside the loop (a progress callback), and
        `step()` or `add_request()` from another thread raise RuntimeError instead of
        stepping the same batch twice (two threads' `embed` corrupted the prefix cache: every
        later call returned wrong vectors). Raises RuntimeError if the engine is claimed or has
        requests in flight (added with `add_request`)."""
        if not self._loop_lock.acquire(blocking=False):
            raise RuntimeError(_BUSY)
        try:
            if self.has_unfinished():
                raise RuntimeError(_BUSY)
            self._loop_owner = threading.get_ident()
            yield
        finally:
            self._loop_owner = None
            self._loop_lock.release()

    def run(self, seqs: list[Sequence], on_done: Callable[[list[Sequence]], None] | None = None) -> None:
        """Run already-built sequences to completion on an idle engine; `on_done` sees each step's finished.

        On any error (or Ctrl-C) every sequence is dropped and its blocks freed, so the engine stays usable.
        """
        if len({id(s) for s in seqs}) < len(seqs) or any(s.submitted for s in seqs):  # before any is queued: the others stay new
            raise ValueError("a sequence is given twice or was already submitted (a Sequence runs once; make a new one with "
                             "Engine.make_sequence)")
        with self.claim_loop():
            try:
                for seq in seqs:
                    self.add_request(seq)
                with step_loop_mode() as callers_mode:
                    while self.has_unfinished():
                        done = self.step()
                        if done and on_done is not None:
                            with callers_mode():
                                on_done(done)
            except BaseException:
                self.scheduler.abort_all()
                raise

    # ------------------------------------------------------------------ public API
    def embed(
        self,
        items: list[Any] | Any,
        *,
        think: bool = True,
        max_trace_tokens: int | None = None,
        instruction: str | None = None,
        errors: str = "raise",
        sampling: SamplingParams | None = None,
        progress: bool | Callable[[int], None] = False,
        truncate_prompt_tokens: int | None = None,
    ) -> EmbedResult:
        """Think (generate a trace) and embed each item; see EmbedResult for what comes back.

        errors="raise": the first bad item raises InvalidInputError before any model work.
        errors="return": bad items get NaN rows and a reason in `errors`; the rest complete
        (whatever goes wrong while preparing an item is that item's error). Wrong call-level
        settings (think, max_trace_tokens, ...) raise InvalidInputError (index None) either way.
        progress: True for a tqdm bar, or a callback given the number of items finished per step.
        truncate_prompt_tokens: see `make_sequence`.
        """
        seqs = self._run(items, think=think, max_trace_tokens=max_trace_tokens, instruction=instruction, errors=errors, sampling=sampling,
                         embed=True, progress=progress, truncate_prompt_tokens=truncate_prompt_tokens)
        n, dim = len(seqs), self.embedding_dim
        emb = torch.full((n, dim), math.nan, dtype=torch.float32)
        for i, s in enumerate(seqs):
            if isinstance(s, Sequence):
                emb[i] = s.embedding
        ok = [s for s in seqs if isinstance(s, Sequence)]
        return EmbedResult(
            embeddings=emb,
            traces=[self.prompts.decode(s.trace_ids) if isinstance(s, Sequence) else "" for s in seqs],
            prompt_token_ids=[list(s.prompt.token_ids) if isinstance(s, Sequence) else [] for s in seqs],
            trace_token_ids=[list(s.trace_ids) if isinstance(s, Sequence) else [] for s in seqs],
            embed_token_ids=[list(s.embed_ids) if isinstance(s, Sequence) else [] for s in seqs],
            errors=[None if isinstance(s, Sequence) else s for s in seqs],
            usage=_usage(ok, self.model_cfg.image_token_id, self.model_cfg.video_token_id),
            stop_reasons=[s.stop_reason if isinstance(s, Sequence) else None for s in seqs],
        )

    def generate_traces(self, items: list[Any] | Any, *, max_trace_tokens: int | None = None, instruction: str | None = None, sampling: SamplingParams | None = None) -> list[str]:
        """Only the think half: the decoded trace of each item (e.g. to cache corpus-side traces)."""
        seqs = self._run(items, think=True, max_trace_tokens=max_trace_tokens, instruction=instruction, errors="raise", sampling=sampling, embed=False, progress=False)
        return [self.prompts.decode(s.trace_ids) for s in seqs]

    def _run(self, items, *, think, max_trace_tokens, instruction, errors, sampling, embed, progress, truncate_prompt_tokens=None) -> list[Sequence | str]:
        if errors not in ("raise", "return"):
            raise InvalidInputError(f"errors must be 'raise' or 'return', got {errors!r}", None, "errors")
        check_settings(think, max_trace_tokens, instruction, sampling, truncate_prompt_tokens, None)
        self.prompts.check_instruction(instruction)
        if not (progress is None or isinstance(progress, bool) or callable(progress)):
            raise InvalidInputError(f"progress must be True, False or a callable, got {type(progress).__name__}", None, "progress")
        if self.has_unfinished() or self._loop_owner is not None:  # early, before any preparation (`claim_loop` decides)
            raise RuntimeError(_BUSY)
        # one item (a text, a dict, a Query), or any collection of them: a list, a tuple, a generator, a pandas Series
        items = [items] if isinstance(items, (str, bytes, dict, Query)) or not isinstance(items, Iterable) else list(items)
        settings = dict(think=think, max_trace_tokens=max_trace_tokens, instruction=instruction, sampling=sampling, embed=embed,
                        truncate_prompt_tokens=truncate_prompt_tokens)
        seqs: list[Sequence | str | None] = [None] * len(items)

        def prepare(i: int) -> Sequence | None:  # in a prep thread: tokenizing and image work stay off this thread
            try:
                seqs[i] = self.make_sequence(items[i], i, tag=i, **settings)
                return seqs[i]
            except InvalidInputError as exc:
                if errors == "raise":
                    raise
                seqs[i] = exc.reason
                return None

        bar = None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), desc="embed" if embed else "think", unit="item")
            progress = bar.update
        on_done = (lambda done: progress(len(done))) if progress else None
        try:
            if errors == "raise":  # every item is checked before any model work
                prepare_all(len(items), prepare)
                self.run([s for s in seqs if isinstance(s, Sequence)], on_done=on_done)
            else:  # bad items become rows: preparing and stepping overlap
                run_prepared(self, len(items), prepare, on_done=on_done)
            failed = sum(isinstance(s, str) for s in seqs)
            if progress and failed:  # (an update by 0 would draw the full bar a second time)
                progress(failed)
        finally:
            if bar is not None:
                bar.close()
        for i, s in enumerate(seqs):  # results the model could not give (a NaN embedding): that item's error
            if isinstance(s, Sequence) and s.error is not None:
                if errors == "raise":
                    raise ModelOutputError(s.error, i)
                seqs[i] = s.error
        return seqs


_BUSY = ("the engine is already running requests (embed() is not re-entrant, and one engine serves one thread's loop at a "
         "time: use one engine per thread, or add_request/step from one loop)")


def _usage(seqs: list[Sequence], image_token_id: int, video_token_id: int) -> dict[str, int]:
    prompt = sum(s.num_prompt_tokens for s in seqs)
    return {
        "prompt_tokens": prompt,
        "image_tokens": sum(s.prompt.token_ids.count(image_token_id) for s in seqs),
        "video_tokens": sum(s.prompt.token_ids.count(video_token_id) for s in seqs),
        "trace_tokens": sum(s.generated_trace_tokens for s in seqs),
        "given_trace_tokens": sum(len(s.trace_ids) - s.generated_trace_tokens for s in seqs),
        "embed_tokens": sum(len(s.embed_ids) for s in seqs),
        "cached_tokens": sum(s.num_cached_tokens for s in seqs),  # prompt tokens served by the prefix cache
        "total_tokens": sum(len(s) for s in seqs),
    }


