"""Distil a derived draft against its target's own next-token distributions, on the CPU, as a fixed amount of work.

A few of the target's layers keep its embeddings and head but lose what the other layers computed,
so out of the box such a draft rarely predicts the target's next token. Training only the kept
layers (and the final norm) to match the target's distributions, on text the target itself writes,
teaches them to stand in for the missing ones; the target's text is exactly what the draft will be
asked to predict at run time.

The work is fixed (`corpus_tokens` answer tokens, `train_steps` training steps), so the draft is the same
on a fast machine and a slow one; only the time it takes differs. `minutes` is an optional cap on one
export's distillation time: when it stops the work early, a warning says how much was done, and the next
export resumes from the cache. The arithmetic precision is chosen by measuring what this CPU does fast
(`measured_precision`): bf16 autocast only where a bf16 matmul is clearly faster than fp32's (AVX-512 BF16,
AMX), fp32 elsewhere, where bf16 runs through slow conversion paths.

Steps, each cached under the user's cache directory and resumable after a kill:
1. corpus: the target answers a mixed prompt set (one greedy and several sampled answers per
   prompt); the top-k of its log-probabilities at every generated position is kept (the corpus is
   saved after every generation batch);
2. training: soft cross-entropy of the draft against those top-k distributions (KL up to the
   target's entropy), AdamW with a warm-up and a cosine decay over the step count; the trainable
   weights and optimizer moments are checkpointed every `checkpoint_seconds`. With `head_tokens`, the
   draft is trained through the restricted head it will run with (the tokens the target writes most):
   its logits cost a sixth of the full head's, so each step is cheaper;
3. the distilled weights are stored under a key of the target's weights, the layer choice and the
   settings (precision included), so a second export with the same settings loads them in a second.
   The corpus has its own key (the target, the precision and the generation settings only), so changing
   a training setting reuses it.
Everything is saved with safetensors / npz (no pickle) and written atomically.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from edgespec.export.distill_prompts import distill_prompts
from edgespec.export.errors import ExportError

# The fixed work, so that the draft does not depend on the machine's speed: what an earlier 15-minute time
# budget produced on one of our machines (docs/drafts.md gives the run and the agreement it reached).
DEFAULT_CORPUS_TOKENS = 140_000
DEFAULT_TRAIN_STEPS = 580
DEFAULT_HEAD_TOKENS = 8192
CORPUS_GENERATOR = "gqa-fp32-head"  # how corpus text and labels are computed (CorpusGenerator): part of the keys
GQA_ATTENTION = "edgespec-gqa"  # the attention CorpusGenerator registers with transformers (gqa_attention)
TRAINER = "length-pools-steps"  # how training batches and the schedule go (batch_rows, learning_rate): draft key only
MATMUL_SHAPE = (256, 576, 1536)  # [m, k] @ [k, n]: a batch of rows through SmolLM2's MLP up-projection
BF16_SPEEDUP = 0.8  # bf16 is chosen only when its matmul takes less than this share of fp32's

Precision = Literal["bf16", "fp32"]


@dataclass
class DistillConfig:
    """The fixed work and the settings that shape the draft.

    `minutes` is a cap on one export's distillation, not a budget: None (the default) does the whole work
    however long it takes, 0 switches distillation off. `precision` None measures the CPU at start.
    """

    corpus_tokens: int = DEFAULT_CORPUS_TOKENS  # generate answers until this many answer tokens exist
    train_steps: int = DEFAULT_TRAIN_STEPS
    minutes: float | None = None
    corpus_share: float = 0.6  # under a cap, corpus generation may take at most this share of it
    precision: Precision | None = None
    new_tokens: int = 128
    samples_per_prompt: int = 16  # sampled answers per prompt, on top of one greedy answer
    temperature: float = 0.8
    top_k: int = 32
    gen_batch: int = 45  # half of the 90 prompts: the greedy round and every sampled round split into full batches
    train_batch: int = 8
    lr: float = 3e-3  # peak (5e-4: 2-4 points less agreement, 6e-3: 3-4 less; docs/drafts.md); then cosine decay
    warmup: float = 0.05
    head_tokens: int = 0  # train through a head of this many tokens (chosen from the corpus); 0: the full head
    seed: int = 0
    checkpoint_seconds: float = 60.0
    prompts: list[str] = field(default_factory=distill_prompts)
    cache_dir: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.minutes is None or self.minutes > 0

    @property
    def cap_seconds(self) -> float | None:
        return None if self.minutes is None else float(self.minutes) * 60.0

    def key_fields(self) -> dict:
        """Settings that change the result (the cache key).

        Neither the cache location nor the cap: work cut short by a cap is never stored as a finished draft,
        only as a checkpoint the next export continues, so a capped run and an uncapped one share their work.
        """
        fields = asdict(self)
        for name in ("cache_dir", "checkpoint_seconds", "minutes", "corpus_share"):
            fields.pop(name)
        fields["generator"] = CORPUS_GENERATOR
        fields["trainer"] = TRAINER
        return fields

    def corpus_fields(self) -> dict:
        """Settings that change the corpus: the precision and the generation settings."""
        training = ("train_steps", "train_batch", "lr", "warmup", "head_tokens", "trainer")
        return {k: v for k, v in self.key_fields().items() if k not in training}

    def jobs(self) -> int:
        """Answers the prompt set can give: a corpus is complete at `corpus_tokens` or when these run out."""
        return len(self.prompts) * (1 + self.samples_per_prompt)


# ----------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class PrecisionChoice:
    precision: Precision
    bf16_seconds: float
    fp32_seconds: float
    threads: int
    capability: str


def matmul_seconds(dtype, shape: tuple[int, int, int] = MATMUL_SHAPE, repeats: int = 3) -> float:
    """Median seconds of one [m, k] @ [k, n] product in `dtype` on the threads torch will use (after a warm-up)."""
    import torch

    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    times = []
    with torch.no_grad():
        torch.matmul(a, b)
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def choose_precision(bf16_seconds: float, fp32_seconds: float) -> Precision:
    """bf16 only when it is clearly faster: it rounds the labels and the training, so a tie goes to fp32."""
    return "bf16" if bf16_seconds < BF16_SPEEDUP * fp32_seconds else "fp32"


def measured_precision(log: Callable[[str], None] = print,
                       timer: Callable[..., float] | None = None) -> PrecisionChoice:
    """Time a representative matmul in bf16 and fp32 here and pick the faster precision (logged with why).

    Why measure instead of assuming bf16: on CPUs without native bf16 (AVX2, AVX-512 without BF16) torch
    converts bf16 through slow paths, and a time-budgeted distillation there ran a handful of steps.
    torch's CPU capability is logged alongside, but it does not say whether its bf16 kernels are fast.
    """
    import torch

    timer = timer or matmul_seconds
    bf16, fp32 = timer(torch.bfloat16), timer(torch.float32)
    choice = PrecisionChoice(choose_precision(bf16, fp32), bf16, fp32, torch.get_num_threads(),
                             torch.backends.cpu.get_cpu_capability())
    m, k, n = MATMUL_SHAPE
    log(f"distill precision: {choice.precision} (a {m}x{k} @ {k}x{n} matmul took {bf16 * 1e3:.2f} ms in bf16 and "
        f"{fp32 * 1e3:.2f} ms in fp32 on {choice.threads} thread{'s' if choice.threads != 1 else ''}; "
        f"torch CPU capability {choice.capability})")
    return choice


def with_precision(config: DistillConfig, log: Callable[[str], None] = print) -> DistillConfig:
    """`config` with its precision fixed: as given, or measured on this CPU."""
    if config.precision is not None:
        if config.precision not in ("bf16", "fp32"):
            raise ExportError(f"distillation precision must be bf16 or fp32, got {config.precision!r}")
        return config
    return replace(config, precision=measured_precision(log).precision)


def default_cache_dir() -> Path:
    base = os.environ.get("EDGESPEC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgespec")
    return Path(base) / "drafts"


def corpus_file(config: DistillConfig, corpus_key: str) -> Path:
    """Where the corpus of `corpus_key` lives (the n-gram table of the bundle reuses its text)."""
    return (config.cache_dir or default_cache_dir()) / f"{corpus_key}.corpus.npz"


def weights_digest(target_model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(target_model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_key(weights: str, fields: dict) -> str:
    """Hash of the target's weights digest and the settings (plus, for a draft, its kept layers)."""
    return hashlib.sha256(json.dumps({"weights": weights, **fields}, sort_keys=True).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """Target-written sequences plus the target's top-k log-probabilities at each answer position.

    Sequence i is `tokens[offsets[i]:offsets[i+1]]`; its answer starts at `starts[i]` (an index into
    the sequence) and row `answer_offsets[i] + j` of `topk_*` is the target's distribution for answer token j.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    starts: np.ndarray
    answer_offsets: np.ndarray
    topk_ids: np.ndarray
    topk_logp: np.ndarray
    seconds: float
    prompts_done: int  # generation jobs done (for resuming)

    @property
    def answer_tokens(self) -> int:
        return int(self.answer_offsets[-1])

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @staticmethod
    def empty(top_k: int) -> Corpus:
        return Corpus(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(1, np.int64),
                      np.zeros((0, top_k), np.int32), np.zeros((0, top_k), np.float16), 0.0, 0)

    def extend(self, seqs: list[np.ndarray], starts: list[int], ids: list[np.ndarray], logp: list[np.ndarray]) -> None:
        self.tokens = np.concatenate([self.tokens, *seqs])
        self.offsets = np.concatenate([self.offsets, self.offsets[-1] + np.cumsum([len(s) for s in seqs])])
        self.starts = np.concatenate([self.starts, np.asarray(starts, np.int64)])
        self.answer_offsets = np.concatenate([self.answer_offsets,
                                              self.answer_offsets[-1] + np.cumsum([len(x) for x in ids])])
        self.topk_ids = np.concatenate([self.topk_ids, *ids])
        self.topk_logp = np.concatenate([self.topk_logp, *logp])

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, tokens=self.tokens, offsets=self.offsets, starts=self.starts,
                 answer_offsets=self.answer_offsets, topk_ids=self.topk_ids, topk_logp=self.topk_logp,
                 seconds=np.array(self.seconds), prompts_done=np.array(self.prompts_done))
        os.replace(tmp, path)

    @staticmethod
    def load(path: Path) -> Corpus:
        with np.load(path, allow_pickle=False) as z:
            return Corpus(z["tokens"], z["offsets"], z["starts"], z["answer_offsets"], z["topk_ids"],
                          z["topk_logp"], float(z["seconds"]), int(z["prompts_done"]))


def _generation_jobs(prompts: list[str], samples: int) -> list[tuple[str, bool]]:
    """(prompt, greedy?) pairs: every prompt once greedily first, then the sampled rounds."""
    return [(p, True) for p in prompts] + [(p, False) for _ in range(samples) for p in prompts]


def corpus_complete(corpus: Corpus, config: DistillConfig) -> bool:
    return corpus.answer_tokens >= config.corpus_tokens or corpus.prompts_done >= config.jobs()


def build_corpus(target_model, tokenizer, config: DistillConfig, path: Path, deadline: float | None,
                 log: Callable[[str], None], clock: Callable[[], float] = time.perf_counter) -> Corpus:
    """Generate (or resume generating) the corpus until `config.corpus_tokens` answer tokens exist, or until
    `deadline` (a `clock` time; None: no deadline) when a cap is set."""
    import torch
    from tqdm import tqdm

    config = with_precision(config, log)
    corpus = Corpus.load(path) if path.is_file() else Corpus.empty(config.top_k)
    jobs = _generation_jobs(config.prompts, config.samples_per_prompt)
    eos = set(eos_ids(target_model, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    start_jobs, start_tokens, t_start = corpus.prompts_done, corpus.answer_tokens, clock()
    generator = None
    bar = tqdm(total=config.corpus_tokens, initial=min(corpus.answer_tokens, config.corpus_tokens), unit="tok",
               desc="distillation corpus", leave=False, disable=None)
    try:
        while not corpus_complete(corpus, config) and (deadline is None or clock() < deadline):
            t0 = clock()
            if generator is None:
                generator = CorpusGenerator(target_model, config.top_k, config.precision)
            batch = jobs[corpus.prompts_done:corpus.prompts_done + config.gen_batch]
            greedy = batch[0][1]
            batch = [job for job in batch if job[1] == greedy]  # one decoding rule per generate() call
            prompt_ids = [_encode(tokenizer, p) for p, _ in batch]
            width = max(len(x) for x in prompt_ids)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, x in enumerate(prompt_ids):  # left padding: every answer starts at column `width`
                ids[row, width - len(x):] = torch.tensor(x)
                mask[row, width - len(x):] = 1
            torch.manual_seed(config.seed + corpus.prompts_done)
            sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": config.temperature,
                                                             "top_k": 0, "top_p": 1.0}
            sequences, top_logp, top_ids = generator.generate(ids, mask, config.new_tokens, pad, sampling)
            seqs, starts, kid, klp = [], [], [], []
            for row, x in enumerate(prompt_ids):
                answer = sequences[row, width:].tolist()
                n = next((j + 1 for j, t in enumerate(answer) if t in eos), len(answer))
                seqs.append(np.asarray(x + answer[:n], np.int64))
                starts.append(len(x))
                kid.append(top_ids[row, :n].numpy().astype(np.int32))
                klp.append(top_logp[row, :n].numpy().astype(np.float16))
            corpus.extend(seqs, starts, kid, klp)
            corpus.prompts_done += len(batch)
            corpus.seconds += clock() - t0
            corpus.save(path)
            bar.update(min(corpus.answer_tokens, config.corpus_tokens) - bar.n)
            eta = _eta(corpus.answer_tokens - start_tokens, config.corpus_tokens - corpus.answer_tokens,
                       clock() - t_start)
            log(f"distill corpus: {corpus.answer_tokens} of {config.corpus_tokens} answer tokens from "
                f"{corpus.prompts_done} answers ({corpus.seconds:.0f}s{eta})")
    finally:
        bar.close()
    if corpus.prompts_done == start_jobs and corpus.answer_tokens:
        log(f"distill corpus: reusing {corpus.answer_tokens} cached answer tokens")
    return corpus


def _eta(done: float, left: float, seconds: float) -> str:
    """', ~N s left' at the rate of this run so far (nothing when there is no rate or nothing left)."""
    if done <= 0 or left <= 0 or seconds <= 0:
        return ""
    return f", ~{left * seconds / done:.0f}s left"


def gqa_attention(module, query, key, value, attention_mask, scaling: float, **_kwargs):
    """Attention as two batched matmuls over the key/value heads, without repeating them (decode steps and the
    prompt pass alike).

    Written by hand because neither of transformers' CPU paths fits the 1-row queries of decode steps:
    SDPA's flash kernel took a third of a decode step at large batches (torch.profiler) and eager
    attention copies every K/V row three times for grouped-query heads. Query heads h·g … h·g+g−1 share
    key/value head h, so they are stacked as g·q rows against that head's keys. Registered with
    transformers' AttentionInterface, with its eager (additive) mask; inference only (no dropout).
    """
    import torch

    b, heads, q, d = query.shape
    kv = key.shape[1]
    groups = heads // kv
    scores = torch.matmul(query.reshape(b, kv, groups * q, d), key.transpose(2, 3)) * scaling
    scores = scores.view(b, kv, groups, q, -1)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None, :, :scores.shape[-1]]
    probs = torch.softmax(scores, -1, dtype=torch.float32).to(value.dtype).view(b, kv, groups * q, -1)
    return torch.matmul(probs, value).view(b, heads, q, d).transpose(1, 2).contiguous(), None


def _register_gqa_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GQA_ATTENTION, gqa_attention)
    AttentionMaskInterface.register(GQA_ATTENTION, eager_mask)


class CorpusGenerator:
    """The target as a fast text generator: its body in the chosen precision with grouped-query attention,
    an fp32 LM head, and the top-k taken per step.

    Why not `generate(output_logits=True)` on the fp32 model under autocast, as before: eager attention's
    GQA key/value repeats and the stored [batch, steps, vocab] logits took most of its time. A bf16 copy is
    faster where bf16 is native (docs/drafts.md), and its labels agree with fp32 teacher
    forcing at 99.2 % of positions against autocast's 98.4 % (768 sampled positions), because the head, where
    bf16 rounding moves the argmax most, stays fp32. With `precision="fp32"` (CPUs without fast bf16) the copy
    stays fp32 and its labels are the fp32 target's.
    The top-k is taken inside a forward hook on the head, so full logits are never kept.
    `gqa_attention` instead of SDPA: more answer tokens per second (docs/benchmark-log/older-runs.md,
    "Distillation corpus generation");
    `attention="sdpa"` is the previous generator, kept for that comparison.
    """

    def __init__(self, target_model, top_k: int, precision: Precision = "bf16", attention: str = GQA_ATTENTION):
        import torch

        if precision not in ("bf16", "fp32"):
            raise ExportError(f"distillation precision must be bf16 or fp32, got {precision!r}")
        if attention == GQA_ATTENTION:
            _register_gqa_attention()
        self.model = copy.deepcopy(target_model).to(torch.bfloat16 if precision == "bf16" else torch.float32)
        self.model.set_attn_implementation(attention)
        head = copy.deepcopy(target_model.get_output_embeddings()).float().requires_grad_(False)  # untied copy
        head.register_forward_pre_hook(lambda _module, args: (args[0].float(),))
        head.register_forward_hook(self._record)
        self.model.config.tie_word_embeddings = False
        self.model.set_output_embeddings(head)
        self.top_k = top_k
        self.steps: list = []

    def _record(self, _module, _args, logits) -> None:
        self.steps.append(logits[:, -1].log_softmax(-1).topk(self.top_k, dim=-1))

    def generate(self, ids, mask, new_tokens: int, pad: int, sampling: dict):
        """(sequences, top-k log-probabilities [B, steps, k], their token ids) of one generate() call."""
        import torch

        self.steps = []
        with torch.no_grad():
            sequences = self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                            pad_token_id=pad, **sampling)
        return (sequences, torch.stack([s.values for s in self.steps], 1),
                torch.stack([s.indices for s in self.steps], 1))


def _encode(tokenizer, prompt: str) -> list[int]:
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    return tokenizer(text, add_special_tokens=False).input_ids


def eos_ids(model, tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += [gen] if isinstance(gen, int) else list(gen or [])
    return sorted(set(ids))


def draft_head_ids(corpus: Corpus, model, tokenizer, n: int) -> np.ndarray:
    """The head a derived draft trains through and is exported with: one choice for both."""
    return head_tokens(corpus, model.config.vocab_size, n, eos_ids(model, tokenizer))


def head_tokens(corpus: Corpus, vocab_size: int, n: int, always: list[int]) -> np.ndarray:
    """The `n` token ids that carry most of the target's probability mass over the corpus, plus `always`.

    A draft head over these rows costs n/vocab of the full one; tokens outside it get probability 0 from
    the draft, which the target's verification makes up for, so the output is unchanged.
    """
    mass = np.zeros(vocab_size, np.float64)
    np.add.at(mass, corpus.topk_ids.ravel(), np.exp(corpus.topk_logp.astype(np.float64)).ravel())
    mass[list(always)] = np.inf
    return np.sort(np.argsort(-mass, kind="stable")[:n]).astype(np.int64)


# ----------------------------------------------------------------------------- training


def trainable_parameters(student) -> dict:
    """The kept layers and the final norm; embeddings and LM head stay the target's (frozen, shared)."""
    for p in student.parameters():
        p.requires_grad_(False)
    params = {n: p for n, p in student.named_parameters() if n.startswith(("model.layers.", "model.norm."))}
    for p in params.values():
        p.requires_grad_(True)
    return params


def _batch(corpus: Corpus, rows: np.ndarray):
    """Right-padded token batch plus, per answer position, (row, column predicting it, corpus answer row)."""
    import torch

    seqs = [corpus.sequence(i) for i in rows]
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    b_idx, col, ans = [], [], []
    for r, (i, s) in enumerate(zip(rows, seqs, strict=True)):
        ids[r, :len(s)] = torch.from_numpy(s)
        n = len(s) - corpus.starts[i]
        b_idx.append(np.full(n, r))
        col.append(corpus.starts[i] - 1 + np.arange(n))  # logits at column c predict token c+1
        ans.append(corpus.answer_offsets[i] + np.arange(n))
    return ids, torch.from_numpy(np.concatenate(b_idx)), torch.from_numpy(np.concatenate(col)), np.concatenate(ans)


def batch_rows(corpus: Corpus, size: int, step: int, seed: int) -> np.ndarray:
    """Sequence indices of training step `step`: every sequence once per epoch, in batches of similar length.

    Why not uniform draws: right-padded batches of 8 sequences drawn at random spent 25 % of each step on
    padding in the default corpus (66-244 tokens); pools of 8 batches sorted by length waste ~5 %. The batches
    of an epoch come in random order, and a step's batch depends only on (seed, step), so a resumed run
    continues with the batches it would have seen.
    """
    n = len(corpus.starts)
    size = min(size, n)
    per_epoch = n // size
    epoch, index = divmod(step, per_epoch)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    lengths = np.diff(corpus.offsets)
    pool = 8 * size
    for s in range(0, n, pool):
        chunk = order[s:s + pool]
        order[s:s + pool] = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches = order[:per_epoch * size].reshape(per_epoch, size)
    return batches[rng.permutation(per_epoch)[index]]


def distill_loss(student, corpus: Corpus, rows: np.ndarray, head_ids: np.ndarray | None = None,
                 precision: Precision = "bf16"):
    """Soft cross-entropy against the target's top-k distribution; also returns top-1 agreement.

    With `head_ids` the draft's logits cover only those tokens (as at run time); target tokens outside
    them carry no loss, since the draft cannot propose them anyway. `precision` "bf16" runs the forward
    pass under bf16 autocast (CPUs with native bf16), "fp32" without it.
    """
    import torch

    ids, b_idx, col, ans = _batch(corpus, rows)
    top_ids = corpus.topk_ids[ans].astype(np.int64)
    p = torch.from_numpy(corpus.topk_logp[ans].astype(np.float32)).exp()
    weight = student.lm_head.weight
    if head_ids is not None:
        weight = weight[torch.from_numpy(head_ids)]
        index = np.searchsorted(head_ids, top_ids).clip(max=len(head_ids) - 1)
        listed = head_ids[index] == top_ids
        p = p * torch.from_numpy(listed)
        top_ids = np.where(listed, index, -1)
    top_ids = torch.from_numpy(top_ids)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
        logits = torch.nn.functional.linear(hidden[b_idx, col], weight)  # only where the target's distribution is known
    logq = logits.float().log_softmax(-1)
    loss = -(p * logq.gather(1, top_ids.clamp(min=0))).sum(-1).mean()
    agree = (logq.argmax(-1) == top_ids[:, 0]).float().mean().item()
    return loss, agree


def learning_rate(config: DistillConfig, progress: float) -> float:
    """Linear warm-up, then cosine decay to 0 at the last step (`progress`: steps done / `train_steps`)."""
    if progress < config.warmup:
        return config.lr * max(progress, 1e-3) / config.warmup
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - config.warmup) / (1.0 - config.warmup))))


def _save_tensors(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={k: json.dumps(v) for k, v in metadata.items()})
    os.replace(tmp, path)


def _load_tensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def _resume(checkpoint: Path, params: dict, opt, sequences: int, log: Callable[[str], None]) -> dict:
    """The training state, with the weights and AdamW moments of a checkpoint made on this same corpus loaded."""
    import torch

    state = {"step": 0, "seconds": 0.0, "agreement": None, "corpus_sequences": sequences}
    if not checkpoint.is_file():
        return state
    tensors, meta = _load_tensors(checkpoint)
    if meta["state"].get("corpus_sequences") != sequences:  # trained on a shorter corpus a cap cut: other batches
        log("distill: the corpus grew since the last checkpoint; training from the start")
        return state
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors["param/" + name])
    opt.load_state_dict(_optimizer_state(opt, params, tensors, meta["optimizer_step"]))
    state = meta["state"]
    log(f"distill: resuming at step {state['step']} ({state['seconds']:.0f}s trained)")
    return state


def train(student, corpus: Corpus, config: DistillConfig, checkpoint: Path, log: Callable[[str], None],
          head_ids: np.ndarray | None = None, deadline: float | None = None,
          clock: Callable[[], float] = time.perf_counter) -> dict:
    """Train to `config.train_steps` steps (resuming a checkpoint made on this same corpus), or until
    `deadline` (a `clock` time) when a cap is set.

    The schedule follows steps, not seconds, so a run stopped by a cap is the start of the full run and the
    next export continues it from the checkpoint.
    """
    import torch
    from tqdm import tqdm

    config = with_precision(config, log)
    params = trainable_parameters(student)
    opt = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=0.0)
    state = _resume(checkpoint, params, opt, len(corpus.starts), log)
    student.train()
    last_save = t_start = clock()
    start_step = state["step"]
    bar = tqdm(total=config.train_steps, initial=min(state["step"], config.train_steps), unit="step",
               desc="distilling draft", leave=False, disable=None)
    try:
        while state["step"] < config.train_steps and (deadline is None or clock() < deadline):
            t0 = clock()
            rows = batch_rows(corpus, config.train_batch, state["step"], config.seed)
            for group in opt.param_groups:
                group["lr"] = learning_rate(config, state["step"] / max(config.train_steps, 1))
            loss, agree = distill_loss(student, corpus, rows, head_ids, config.precision)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            opt.step()
            state["step"] += 1
            state["seconds"] += clock() - t0
            a = state["agreement"]
            state["agreement"] = agree if a is None else 0.95 * a + 0.05 * agree
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", top1=f"{state['agreement']:.1%}")
            if clock() - last_save > config.checkpoint_seconds:
                _save_checkpoint(checkpoint, params, opt, state)
                last_save = clock()
                if bar.disable:  # no terminal for the bar: a line per checkpoint instead
                    eta = _eta(state["step"] - start_step, config.train_steps - state["step"], last_save - t_start)
                    log(f"distill: step {state['step']} of {config.train_steps}, running top-1 agreement "
                        f"{state['agreement']:.1%}{eta}")
    finally:
        bar.close()
        student.eval()
    _save_checkpoint(checkpoint, params, opt, state)
    log(f"distill: {state['step']} steps in {state['seconds']:.0f}s, running top-1 agreement "
        f"{(state['agreement'] or 0):.1%} on the corpus")
    return state


def _save_checkpoint(path: Path, params: dict, opt, state: dict) -> None:
    tensors = {"param/" + n: p for n, p in params.items()}
    step = 0
    for name, p in params.items():
        s = opt.state.get(p)
        if s:
            tensors["exp_avg/" + name] = s["exp_avg"]
            tensors["exp_avg_sq/" + name] = s["exp_avg_sq"]
            step = int(s["step"])
    _save_tensors(path, tensors, {"state": state, "optimizer_step": step})


def _optimizer_state(opt, params: dict, tensors: dict, step: int) -> dict:
    """AdamW state_dict rebuilt from the checkpoint's moment tensors (parameter order as in `params`)."""
    import torch

    sd = opt.state_dict()
    sd["state"] = {}
    for i, name in enumerate(params):
        if "exp_avg/" + name in tensors:
            sd["state"][i] = {"step": torch.tensor(float(step)), "exp_avg": tensors["exp_avg/" + name],
                              "exp_avg_sq": tensors["exp_avg_sq/" + name]}
    return sd


def distill(target_model, tokenizer, student, layers: list[int], config: DistillConfig,
            log: Callable[[str], None] = print, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Distil `student` in place (or load the cached result); returns what was done and measured.

    Only a finished run (the whole corpus, every step) is stored as the cached draft; a run a cap stopped
    early warns in one line, leaves its corpus and checkpoint for the next export, and returns its partial
    training (`"complete": False`).
    """
    import torch

    t_start = clock()
    config = with_precision(config, log)
    cache = config.cache_dir or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    weights = weights_digest(target_model)
    key = cache_key(weights, {"layers": layers, **config.key_fields()})
    corpus_key = cache_key(weights, config.corpus_fields())
    final = cache / f"{key}.draft.safetensors"
    params = trainable_parameters(student)
    if final.is_file():
        tensors, meta = _load_tensors(final)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
        log(f"distill: loaded cached distilled draft {final}")
        return {**meta["info"], "cache": "hit", "cache_key": key, "corpus_key": corpus_key}
    torch.manual_seed(config.seed)
    cap = config.cap_seconds
    corpus = build_corpus(target_model, tokenizer, config, corpus_file(config, corpus_key),
                          None if cap is None else t_start + cap * config.corpus_share, log, clock)
    if corpus.answer_tokens == 0:
        if cap is None:
            raise ExportError("the distillation prompts gave no corpus text")
        raise ExportError(f"the --distill-minutes cap ({config.minutes:g}) ended before any corpus text was "
                          "generated; raise it, or leave it out to do the whole distillation")
    checkpoint = cache / f"{key}.ckpt.safetensors"
    head_ids = None
    if config.head_tokens:
        head_ids = draft_head_ids(corpus, target_model, tokenizer, config.head_tokens)
    state = train(student, corpus, config, checkpoint, log, head_ids, None if cap is None else t_start + cap, clock)
    complete = corpus_complete(corpus, config) and state["step"] >= config.train_steps
    info = {"precision": config.precision, "corpus_answer_tokens": corpus.answer_tokens,
            "corpus_seconds": round(corpus.seconds, 1), "train_steps": state["step"],
            "train_seconds": round(state["seconds"], 1), "corpus_top1_agreement": state["agreement"],
            "complete": complete, "minutes_cap": config.minutes,
            "wall_seconds_this_run": round(clock() - t_start, 1)}
    if not complete:
        log(cut_short_warning(config, corpus.answer_tokens, state["step"]))
        return {**info, "cache": "partial", "cache_key": key, "corpus_key": corpus_key}
    _save_tensors(final, params, {"info": info})
    checkpoint.unlink(missing_ok=True)  # the final weights supersede it; the corpus stays (head token choice)
    return {**info, "cache": "written", "cache_key": key, "corpus_key": corpus_key}


def cut_short_warning(config: DistillConfig, corpus_tokens: int, steps: int) -> str:
    """The one line that says a cap stopped the distillation before its fixed work was done."""
    return (f"warning: --distill-minutes {config.minutes:g} cut the distillation short: "
            f"{min(corpus_tokens, config.corpus_tokens)} of {config.corpus_tokens} corpus answer tokens, "
            f"{steps} of {config.train_steps} training steps; this draft is weaker than the default's, "
            "and the next export continues the work from the cache")
