"""Perplexity and fidelity to the full-precision model, as PROTOCOL.md defines them.

- Perplexity: non-overlapping ``window``-token windows of the evaluation stream (2048),
  the first ``max_windows`` (16) or all full windows if fewer; ``exp`` of the mean
  next-token NLL over every predicted token.
- Fidelity: mean ``KL(P_fp || P_quant)`` of the next-token distributions and top-1
  agreement (share of positions whose argmax tokens agree), over every position of the
  first ``kl_windows`` (4) windows.

The reference model (or its cached statistics, `ReferenceStats`) and the evaluated model
see the same windows in one pass, so a comparison costs one forward of each per window.

Each figure is also kept as sums per block of ``BLOCK_TOKENS`` consecutive positions of a
window (`BlockSums`), the units `lowbit.eval.bootstrap` resamples for confidence intervals.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError

CHUNK = 512  # positions per log-softmax chunk: bounds memory at chunk × vocab floats
BLOCK_TOKENS = 256  # positions per bootstrap unit (a block of consecutive positions of one window)


@dataclass(frozen=True)
class EvalConfig:
    """The windows an evaluation uses; defaults are the protocol's."""

    window: int = 2048
    max_windows: int = 16
    kl_windows: int = 4

    def __post_init__(self) -> None:
        if self.window < 2 or self.max_windows < 1 or self.kl_windows < 0:
            raise LowbitError(
                f"evaluation needs window >= 2, max_windows >= 1 and kl_windows >= 0, got {self.window}, "
                f"{self.max_windows}, {self.kl_windows}."
            )


@dataclass
class BlockSums:
    """Sums per block of ``BLOCK_TOKENS`` positions, window after window: the bootstrap's units."""

    nll: list[float] = field(default_factory=list)  # summed next-token NLL
    count: list[int] = field(default_factory=list)  # predicted positions
    kl: list[float] = field(default_factory=list)  # summed KL(P_ref || P) over the KL windows' blocks
    agree: list[int] = field(default_factory=list)  # top-1 agreements there
    kl_count: list[int] = field(default_factory=list)  # positions there

    def add_nll(self, nll: Tensor) -> None:
        """Per-position NLL of one window, (T,)."""
        for block in nll.split(BLOCK_TOKENS):
            self.nll.append(float(block.sum()))
            self.count.append(block.numel())

    def add_kl(self, kl: Tensor, agree: Tensor) -> None:
        """Per-position KL and top-1 agreement of one window, (T,) each."""
        for k, a in zip(kl.split(BLOCK_TOKENS), agree.split(BLOCK_TOKENS)):
            self.kl.append(float(k.sum()))
            self.agree.append(int(a.sum()))
            self.kl_count.append(k.numel())


@dataclass
class TextResult:
    """Evaluation of one model on one token stream."""

    ppl: float
    tokens: int
    windows: int
    reference_ppl: float | None = None
    kl: float | None = None
    top1: float | None = None
    blocks: BlockSums = field(default_factory=BlockSums, repr=False)

    def to_dict(self) -> dict[str, float | int | None]:
        return {k: v for k, v in asdict(self).items() if k != "blocks"}


@dataclass
class ReferenceStats:
    """What evaluation needs of the reference model on one stream, computed once.

    ``logprobs`` holds the reference's log-probabilities for the KL windows, (T, V) each,
    in float32; that is windows × window × vocab × 4 bytes (1.6 GB for the default model).
    """

    nll_sum: float
    count: int
    logprobs: list[Tensor]
    windows: Tensor  # (W, window) the token windows these statistics belong to
    blocks: BlockSums = field(default_factory=BlockSums)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.count)


def windows_of(tokens: Tensor, config: EvalConfig) -> Tensor:
    """The evaluation windows, (W, window) — full windows only."""
    n = min(tokens.numel() // config.window, config.max_windows)
    if n == 0:
        raise LowbitError(
            f"the evaluation text has {tokens.numel()} tokens, fewer than one {config.window}-token window."
        )
    return tokens[: n * config.window].reshape(n, config.window)


@torch.inference_mode()
def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    """Next-token logits for one window, (T, V) float32."""
    device = next(iter(model.buffers()), next(model.parameters())).device
    out = model(input_ids=ids[None].to(device), use_cache=False)
    return out.logits[0].float().cpu()


def _log_softmax_chunks(logits: Tensor) -> list[Tensor]:
    return [torch.log_softmax(chunk, dim=-1) for chunk in logits.split(CHUNK)]


def _nll(logprobs: list[Tensor], ids: Tensor) -> Tensor:
    """NLL of each of ids[1:] under logprobs[:-1] (the last position predicts nothing here), (T-1,) float64."""
    parts, start = [], 0
    targets = ids[1:]
    for chunk in logprobs:
        end = min(start + chunk.shape[0], targets.numel())
        if end > start:
            parts.append(-chunk[: end - start].gather(-1, targets[start:end, None])[:, 0].double())
        start += chunk.shape[0]
    return torch.cat(parts)


def _kl_top1(ref: list[Tensor], test: list[Tensor]) -> tuple[Tensor, Tensor]:
    """KL(P_ref || P_test) and top-1 agreement at each position of a window, (T,) each."""
    kl = torch.cat([(lp_ref.exp() * (lp_ref - lp_test)).sum(-1).double() for lp_ref, lp_test in zip(ref, test)])
    agree = torch.cat([lp_ref.argmax(-1) == lp_test.argmax(-1) for lp_ref, lp_test in zip(ref, test)])
    return kl, agree


def reference_stats(model: nn.Module, tokens: Tensor, config: EvalConfig = EvalConfig(),
                    desc: str = "reference", progress: bool = True) -> ReferenceStats:
    """Run the reference once over the windows and keep what comparisons need."""
    kept, blocks = [], BlockSums()
    windows = windows_of(tokens, config)
    for i, ids in enumerate(tqdm(windows, desc=desc, unit="window", leave=False,
                                         disable=None if progress else True)):
        logprobs = _log_softmax_chunks(_logits(model, ids))
        blocks.add_nll(_nll(logprobs, ids))
        if i < config.kl_windows:
            kept.append(torch.cat(logprobs))
    return ReferenceStats(sum(blocks.nll), sum(blocks.count), kept, windows, blocks)


def evaluate_tokens(model: nn.Module, tokens: Tensor, reference: nn.Module | ReferenceStats | None = None,
                    config: EvalConfig = EvalConfig(), desc: str = "eval", progress: bool = True) -> TextResult:
    """Perplexity of ``model`` on ``tokens``, and KL / top-1 against ``reference`` if given."""
    windows = windows_of(tokens, config)
    if isinstance(reference, ReferenceStats) and not torch.equal(reference.windows, windows):
        raise LowbitError("the cached reference statistics were computed on other text or windows.")
    blocks, ref_blocks = BlockSums(), BlockSums()
    for i, ids in enumerate(tqdm(windows, desc=desc, unit="window", leave=False,
                                         disable=None if progress else True)):
        logprobs = _log_softmax_chunks(_logits(model, ids))
        blocks.add_nll(_nll(logprobs, ids))
        if isinstance(reference, nn.Module):
            ref_logprobs = _log_softmax_chunks(_logits(reference, ids))
            ref_blocks.add_nll(_nll(ref_logprobs, ids))
        elif isinstance(reference, ReferenceStats) and i < len(reference.logprobs):
            ref_logprobs = list(reference.logprobs[i].split(CHUNK))
        else:
            ref_logprobs = None
        if ref_logprobs is not None and i < config.kl_windows:
            blocks.add_kl(*_kl_top1(ref_logprobs, logprobs))
    nll_sum, count = sum(blocks.nll), sum(blocks.count)
    if not math.isfinite(nll_sum):
        raise LowbitError("the model produced non-finite log-probabilities; its weights are broken.")
    result = TextResult(ppl=math.exp(nll_sum / count), tokens=count, windows=int(windows.shape[0]), blocks=blocks)
    if isinstance(reference, nn.Module):
        result.reference_ppl = math.exp(sum(ref_blocks.nll) / count)
    elif isinstance(reference, ReferenceStats):
        result.reference_ppl = reference.ppl
    if reference is not None and blocks.kl_count:
        result.kl = sum(blocks.kl) / sum(blocks.kl_count)
        result.top1 = 100.0 * sum(blocks.agree) / sum(blocks.kl_count)
    return result
