"""GRPO on JEC-QA's verifiable answers: setup -> fit, on top of TRL's ``GRPOTrainer`` and peft.

TRL owns the algorithm (groups, advantages, clipping, KL, the loop, checkpoints, resume); lawtune adds what the
task needs: its reasoning prompts (already rendered text), the rewards of ``rewards.py``, rollouts through its
generation engine on the live weights, the held-out accuracy in reasoning mode with the best adapter kept, and the
output folder ``lawtune train`` writes (so eval, compare, merge and serve take the result unchanged).

``rollout_func`` is experimental in TRL; pyproject.toml pins the TRL range whose hook this is written against.
"""

from __future__ import annotations

import json
import logging
import os
import random
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

from ..card import refresh_cards, write_card
from ..config import MUTATING_INITS, ConfigError, EvalConfig, GenerationConfig, GrpoRun
from ..dist import gather_objects, is_main_process, sharded_launch
from ..errors import UsageError
from ..model import (
    ModelError,
    base_fingerprint,
    check_adapter,
    check_adapter_base,
    count_parameters,
    load_base_model,
    load_tokenizer,
    lora_config,
)
from ..preempt import Sigterm
from ..prompts import CHAT_INSTRUCTION, PLAIN_TEMPLATE, render_prompt
from ..rundir import (
    FINAL_STEPS,
    MANIFEST_FILE,
    STATEMENT_KEY_VERSION,
    adapter_prompt_format,
    resume_checkpoint,
    save_initial_adapter,
    save_model_dir,
)
from . import rewards as R
from .callbacks import GcPauses, HeldOutEvalCallback, MetricsCallback, StopOnSigterm
from .common import prepare_data, shared_arguments, start_run, train_to_the_end, write_curves
from .kernels import compile_layers, install_packed_block_mask

log = logging.getLogger("lawtune")

# ----------------------------------------------------------------------------- TRL, where lawtune differs


def trainer_class():
    """lawtune's GRPO trainer class: TRL's GRPOTrainer with the hooks below (built at call time, as TRL is imported
    only when a run starts)."""
    from ..compat import attn_implementation, grpo_log_metric, grpo_tokenizer, grpo_trainer_with_hooks

    # The base is a class compat.py builds at run time; mypy cannot check a call as a base class (it becomes Any).
    class LawtuneGRPOTrainer(grpo_trainer_with_hooks()):  # type: ignore[misc]
        """TRL's GRPOTrainer with lawtune's prompts, group metrics and dynamic sampling (its private steps reach
        these hooks through compat.py).

        ``dynamic``: grpo.dynamic_sampling's settings, None = off (TRL's behaviour). ``packed``: grpo.packed, the
        forward passes of the loss and of the old and reference log-probabilities on packed rows (``packed_logps``);
        False = TRL's padded rows."""

        def __init__(self, *args, dynamic: DynamicSampling | None = None, packed: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self.dynamic = dynamic
            self.packed = packed
            self.one_row: bool | None = None  # packed_logps's layout; None = by the attention (ONE_ROW_ATTENTION)
            self.group_tags: list[str] | None = None  # per group of a rollout call: what its sampling seed adds
            self.informative: torch.Tensor | None = None  # per group of the last scored batch: its rewards differ
            self.skip_update = False  # the coming optimizer step has no informative group

        def tokenize_prompts_hook(self, prompts: list):
            # lawtune's prompts are rendered text whose special tokens (the BOS among them) are written out: TRL
            # would add the tokenizer's own on top (a second BOS for R1-Distill's tokenizer).
            return grpo_tokenizer(self)(prompts, add_special_tokens=False)["input_ids"], None, {}

        def calculate_rewards_hook(self, inputs, prompts, completions, completion_ids_list):
            rewards = super().calculate_rewards_hook(inputs, prompts, completions, completion_ids_list)
            if self.model.training:
                # TRL's test of a group that teaches nothing (frac_reward_zero_std): its weighted rewards' std is 0.
                total = (rewards * self.reward_weights.to(rewards.device).unsqueeze(0)).nansum(dim=1)
                spread = total.view(-1, self.num_generations).std(dim=1)
                self.informative = ~torch.isclose(spread, torch.zeros_like(spread))
            if "exact_set" in self.reward_func_names:
                mode = "train" if self.model.training else "eval"
                exact = rewards[:, self.reward_func_names.index("exact_set")].view(-1, self.num_generations)
                # A group with no exact answer teaches exact_set nothing; one that is always right neither.
                grpo_log_metric(self, mode, "groups/any_exact", (exact > 0.5).any(dim=1).float().mean().item())
                grpo_log_metric(self, mode, "groups/all_exact", (exact > 0.5).all(dim=1).float().mean().item())
            return rewards

        def generate_and_score_hook(self, inputs):
            if self.dynamic is None or not self.model.training:
                return super().generate_and_score_hook(inputs)
            return self.dynamic_batch(inputs, self.dynamic)

        def scored(self, inputs: list[dict]) -> tuple[dict, torch.Tensor]:
            """TRL's scored batch of ``inputs`` and, per group, whether its rewards differ."""
            self.informative = None
            batch = super().generate_and_score_hook(inputs)
            assert self.informative is not None  # calculate_rewards_hook ran, in training mode
            return batch, self.informative.cpu()

        def dynamic_batch(self, inputs: list[dict], dynamic: DynamicSampling) -> dict:
            """The step's generation batch with dynamic sampling: its own groups sampled and scored, then groups of
            further questions in place of those whose rewards are all equal, until the step's number of groups
            differ or max_resample extra groups were sampled. The batch keeps its size (TRL splits it into the
            step's micro-batches): what is missing is filled with groups that teach nothing, their completions
            masked out of the loss (as grpo.mask_truncated masks a cut one).

            On several processes the counts are the step's, all ranks together: TRL gathers every rank's rewards,
            so each rank holds every group's verdict and all take the same decisions (and make the same collective
            calls) without a further exchange. Each rank samples an equal share of the extra questions (TRL gathers
            equal shares), disjoint ones; the groups kept are then dealt out so that every rank trains as many as
            its own batch held, a rank's groups going to another where the informative ones lie unevenly."""
            size = self.num_generations
            ranks, rank = self.accelerator.num_processes, self.accelerator.process_index
            wanted = len(inputs) // size * ranks
            cap = wanted if dynamic.max_resample is None else dynamic.max_resample
            step = self.state.global_step
            batch, differ = self.scored(inputs)
            parts, informative = [batch], [differ]
            used: set | None = None
            resampled = 0
            while (have := sum(int(m.sum()) for m in informative)) < wanted and resampled < cap:
                if used is None:  # every rank's questions: the extra ones are none of the step's
                    used = {qid for ids in gather_objects([row["id"] for row in inputs]) for qid in ids}
                share = -(-min(wanted - have, cap - resampled) // ranks)  # rounded up: equal shares
                picks = dynamic.draw(self.train_dataset, used, step, resampled, share * ranks)
                share = len(picks) // ranks
                if not share:
                    break
                drawn = [self.train_dataset[i] for i in picks[: share * ranks]]
                used.update(row["id"] for row in drawn)
                first = resampled + rank * share  # the index of this rank's first extra group among the step's
                self.group_tags = [f"+{first + k}" for k in range(share)]
                try:
                    batch, differ = self.scored([dict(row) for row in drawn[rank * share:(rank + 1) * share]
                                                 for _ in range(size)])
                finally:
                    self.group_tags = None
                parts.append(batch)
                informative.append(differ)
                resampled += share * ranks
            plan, kept = deal_groups(informative, ranks, wanted)
            batch = concat_batches(parts, grpo_tokenizer(self).pad_token_id)
            mine, device = plan[rank], batch["completion_mask"].device
            if any(source != r for r, groups in enumerate(plan) for source, _, _ in groups):
                # Some rank trains groups another sampled (every rank sees the plan, so all take this branch): every
                # rank's scored groups to every rank, through the CPU.
                sources = gather_objects({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
                batch = concat_batches(sources, grpo_tokenizer(self).pad_token_id)
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            else:
                sources, mine = [batch], [(0, j, keep) for _, j, keep in mine]
            offsets = [0]
            for source in sources:
                offsets.append(offsets[-1] + len(source["completion_mask"]))
            rows = torch.tensor([offsets[source] + j * size + k for source, j, _ in mine for k in range(size)])
            batch = {k: v[rows.to(v.device)] if isinstance(v, torch.Tensor) and v.ndim else v for k, v in batch.items()}
            dropped = torch.tensor([not keep for _, _, keep in mine]).repeat_interleave(size)
            batch["completion_mask"][dropped.to(device)] = 0
            mask = batch["completion_mask"] if "tool_mask" not in batch else batch["completion_mask"] * batch["tool_mask"]
            batch["num_items_in_batch"] = self.accelerator.gather(mask.sum()).sum()
            grpo_log_metric(self, "train", "groups/sampled", wanted + resampled)
            grpo_log_metric(self, "train", "groups/kept", kept)
            grpo_log_metric(self, "train", "groups/resampled", resampled)
            self.skip_update = kept == 0
            if self.skip_update and is_main_process():  # every rank skips it; one says so
                log.warning("step %d: no group's rewards differ in %d sampled (%d extra, grpo.max_resample); the step "
                            "is skipped", step + 1, wanted + resampled, resampled)
            return batch

        def per_token_logps_hook(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                 compute_entropy=False, compute_aux_loss=False, **model_inputs):
            # TRL's loss, clipping, KL and metrics stay as they are, on its padded [rows, completion] tensors: only
            # the forward pass, where the time goes, is packed. Images and MoE routers keep TRL's padded pass.
            if not self.packed or compute_aux_loss or any(v is not None for v in model_inputs.values()):
                return super().per_token_logps_hook(model, input_ids, attention_mask, logits_to_keep,
                                                    batch_size=batch_size, compute_entropy=compute_entropy,
                                                    compute_aux_loss=compute_aux_loss, **model_inputs)
            size = batch_size or input_ids.size(0)  # TRL's sequences per forward pass, packed together
            one_row = self.one_row
            if one_row is None:
                one_row = attn_implementation(self.accelerator.unwrap_model(model).config) in ONE_ROW_ATTENTION
            logps, entropies = [], []
            for start in range(0, input_ids.size(0), size):
                with self.accelerator.autocast():
                    lp, ent = packed_logps(model, input_ids[start:start + size], attention_mask[start:start + size],
                                           logits_to_keep, compute_entropy, one_row)
                logps.append(lp)
                if ent is not None:
                    entropies.append(ent)
            return torch.cat(logps), torch.cat(entropies) if entropies else None, None

        def save_hook(self, output_dir: str | None = None, state_dict=None):
            super().save_hook(output_dir, state_dict)
            # beta > 0 on a continued adapter: TRL keeps the starting adapter as "ref" beside it. It is rebuilt from
            # grpo.adapter on every start, so the saved adapter folders hold only the trained one.
            import shutil

            ref = Path(output_dir or self.args.output_dir) / "ref"
            if ref.is_dir() and (ref / "adapter_config.json").is_file():
                shutil.rmtree(ref)

    return LawtuneGRPOTrainer


# Attention kernels that keep a packed row's sequences apart at the cost of each sequence alone (flex through
# install_packed_block_mask's document mask, flash through its variable-length form): a micro-batch is one row. Any
# other (sdpa, eager) attends over a whole row through a dense mask, so rows are then no longer than the longest
# sequence.
ONE_ROW_ATTENTION = ("flex_attention", "flash_attention_2", "flash_attention_3")


def pack_rows(lengths: list[int], width: int) -> tuple[list[int], list[int], int]:
    """First-fit decreasing: the (row, offset) of each sequence of these lengths in rows of ``width`` tokens, and the
    number of rows."""
    rows, offsets, used = [0] * len(lengths), [0] * len(lengths), list[int]()
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((k for k, u in enumerate(used) if u + lengths[i] <= width), len(used))
        if row == len(used):
            used.append(0)
        rows[i], offsets[i] = row, used[row]
        used[row] += lengths[i]
    return rows, offsets, len(used)


def packed_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, entropy: bool,
                 one_row: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probabilities (and entropies) of the completions of TRL's padded rows (prompt left-padded,
    completion right-padded; ``attention_mask`` 1 at real tokens; the last ``logits_to_keep`` columns are the
    completion), computed on packed rows: the sequences' real tokens end to end, positions restarting at 0 at each,
    so attention stays within a sequence (flex attention's document mask where install_packed_block_mask is on,
    transformers' own packed-sequence mask otherwise). ``one_row``: all in one row; else rows as long as the longest
    sequence (see ONE_ROW_ATTENTION), each ending in padding on positions of its own. Returned as TRL returns them:
    [rows, logits_to_keep], 0 at padding.

    The head is TRL's fused one (``fused_lm_head=True``, added to the policy by GRPOTrainer): log-softmax at the
    temperature of the rollouts, in tiles of tokens x vocabulary, with a backward that recomputes each tile, so no
    [tokens x vocabulary] tensor exists; on a GPU only the completion positions reach it. A sequence whose
    completion is masked out entirely (grpo.mask_truncated, dynamic sampling's filler) is left out."""
    real = attention_mask.bool()
    completion = torch.zeros_like(real)
    completion[:, -logits_to_keep:] = real[:, -logits_to_keep:]
    scored = completion.any(dim=1)
    if not bool(scored.any()):
        # Nothing to score: one sequence still goes through, so the loss stays connected to the weights (a zero
        # loss whose backward runs, as on TRL's padded pass).
        scored[0] = True
    real = real & scored.unsqueeze(1)
    lengths = real.sum(dim=1)
    kept = scored.nonzero().flatten()
    kept_lengths = lengths[kept].tolist()
    width = sum(kept_lengths) if one_row else max(kept_lengths)
    rows, offsets, n_rows = pack_rows(kept_lengths, width)
    device = input_ids.device
    start = torch.zeros(len(real), dtype=torch.long, device=device)  # each sequence's first cell in the rows
    start[kept] = torch.tensor([r * width + o for r, o in zip(rows, offsets)], dtype=torch.long, device=device)
    position = real.cumsum(dim=1)[real] - 1  # of each real token (row-major), restarting at each sequence
    cell = start.repeat_interleave(lengths) + position
    ids = input_ids.new_zeros(n_rows * width)  # padding cells: any token, never attended to nor scored
    ids[cell] = input_ids[real]
    targets = completion[real]
    labels = torch.full_like(ids, -100)
    labels[cell[targets]] = input_ids[real][targets]
    # Each row's tail of padding runs on positions of its own (a sequence of its own, never attended to).
    column = torch.arange(width, device=device)
    used = torch.zeros(n_rows, dtype=torch.long, device=device).index_add_(
        0, torch.tensor(rows, device=device), torch.tensor(kept_lengths, device=device))
    positions = (column - used.unsqueeze(1)).clamp(min=0).flatten()
    positions[cell] = position
    out = model(input_ids=ids.view(n_rows, width), position_ids=positions.view(n_rows, width),
                labels=labels.view(n_rows, width), fused_lm_head=True)
    where = completion[:, -logits_to_keep:]
    at = cell[targets]  # the cells of the completion tokens, in TRL's row-major order

    def unpack(per_token: torch.Tensor) -> torch.Tensor:
        # The head's outputs are for the labels shifted by one (the token in cell c from the hidden state at c - 1).
        shifted = F.pad(per_token, (1, 0)).flatten()
        return per_token.new_zeros(where.shape).masked_scatter(where, shifted[at])

    return unpack(out.log_probs), unpack(out.entropy) if entropy else None


@dataclass
class DynamicSampling:
    """grpo.dynamic_sampling's settings and its draw of further questions."""

    max_resample: int | None
    seed: int

    def draw(self, dataset, used: set, step: int, index: int, n: int) -> list[int]:
        """Up to ``n`` rows of ``dataset`` whose question is not yet in the step (any, once all are), chosen by
        (seed, step, index of the first extra group): a rerun or a resumed run draws the same."""
        pool = [i for i, qid in enumerate(dataset["id"]) if qid not in used] or list(range(len(dataset)))
        return random.Random(f"{self.seed}\x1f{step}\x1f{index}").sample(pool, min(n, len(pool)))


def deal_groups(informative: list[torch.Tensor], ranks: int, wanted: int) -> tuple[list[list[tuple[int, int, bool]]], int]:
    """Which scored groups each rank trains in a step of dynamic sampling. ``informative``: per scoring call, each
    group's verdict (its rewards differ), every rank's groups in rank order (as TRL gathers the rewards). The step
    keeps the first ``wanted`` informative groups in the order of one process (the step's own groups, then the extra
    ones as drawn) and fills up with others (trained on nothing); rank r gets the r-th ``wanted / ranks`` of them.
    Returns per rank its groups as (the rank that sampled it, its index among that rank's groups, kept), and the
    number kept."""
    order: list[tuple[int, int, bool]] = []
    seen = [0] * ranks  # groups of each rank in the calls so far
    for verdicts in informative:
        share = len(verdicts) // ranks
        for r in range(ranks):
            order += [(r, seen[r] + j, bool(verdicts[r * share + j])) for j in range(share)]
            seen[r] += share
    kept = [g for g in order if g[2]][:wanted]
    chosen = kept + [g for g in order if not g[2]][: wanted - len(kept)]
    local = wanted // ranks
    return [chosen[r * local:(r + 1) * local] for r in range(ranks)], len(kept)


# Tensors of TRL's scored batch padded on the left (the prompts); the rest of its [rows, tokens] ones on the right.
LEFT_PADDED = ("prompt_ids", "prompt_mask")


def concat_batches(parts: list[dict], pad_id: int) -> dict:
    """Scored generation batches (TRL's dicts) as one: [rows] tensors concatenated, [rows, tokens] ones padded to the
    widest first (ids with the pad token, masks and log-probabilities with 0, a tool mask with 1); scalars (the
    token count of the loss) from the first, to be recounted."""
    out = {}
    for key, first in parts[0].items():
        if not isinstance(first, torch.Tensor) or first.ndim == 0:
            out[key] = first
            continue
        tensors = [p[key] for p in parts]
        if first.ndim > 1:
            width = max(t.size(1) for t in tensors)
            value = pad_id if key in ("prompt_ids", "completion_ids") else 1 if key == "tool_mask" else 0
            tensors = [F.pad(t, (width - t.size(1), 0) if key in LEFT_PADDED else (0, width - t.size(1)), value=value)
                       for t in tensors]
        out[key] = torch.cat(tensors)
    return out


class SkipEmptySteps(TrainerCallback):
    """A step that dynamic sampling left without an informative group changes nothing: its (zero) gradients are
    dropped before the optimizer step, which then leaves those parameters and their moments as they were (AdamW's
    momentum and weight decay would otherwise still move them)."""

    def __init__(self) -> None:
        self.trainer: Any = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer is not None and self.trainer.skip_update:
            for p in self.trainer.model.parameters():
                p.grad = None
            self.trainer.skip_update = False


class EngineRollout:
    """TRL's ``rollout_func`` on lawtune's generation engine.

    TRL hands the step's prompts with each question repeated once per completion of its group; the engine samples a
    group from one prefill (``n`` samples), each sample from (grpo.seed, the question id and step, the sample index),
    so a rollout does not depend on what else is generated beside it. The engine holds the model itself (or, with
    grpo.fold_adapter, the holder's folded copy of it, refreshed before each rollout): it samples
    from the weights the last optimizer step left."""

    def __init__(self, cfg: GrpoRun, tokenizer, ids_by_prompt: dict[str, str], engines):
        self.cfg, self.tokenizer, self.ids_by_prompt = cfg, tokenizer, ids_by_prompt
        self.engines = engines  # the held-out evaluation's holder: one engine with the rows of both, closed at the end
        self.max_len = cfg.data.max_length  # prompts longer than max_length - max_completion_length were dropped

    def sampling(self, n: int, end_ids=()):
        """How a group of ``n`` completions is sampled; ``end_ids``: the tokens that end a completion besides the
        tokenizer's end token."""
        from ..generation.engine import SamplingParams

        g = self.cfg.grpo
        return SamplingParams(max_new_tokens=g.max_completion_length, temperature=g.temperature, top_p=g.top_p,
                              seed=g.seed, n=n, stop_token_ids=tuple(end_ids))

    def __call__(self, prompts: list[str], trainer) -> dict:
        # TRL lays a group's num_generations copies side by side, and lawtune's config makes a rank's generation
        # batch (grpo.per_device_batch_size x gradient_accumulation_steps) whole groups, so no group spans ranks
        # and each group's samples 0..n-1 are drawn here, by one rank: two ranks never draw the same "different"
        # sample of a group. (Blocks, not runs of equal prompts: two questions may render to the same prompt.)
        size = trainer.num_generations
        blocks = [prompts[i:i + size] for i in range(0, len(prompts), size)]
        if any(len(block) != size or block.count(block[0]) != size for block in blocks):
            raise RuntimeError(f"grpo rollouts: {len(prompts)} prompts are not whole groups of grpo.num_generations="
                               f"{size} (a group split between processes?)")
        groups = [(block[0], size) for block in blocks]
        ids = self.tokenizer([p for p, _ in groups], add_special_tokens=False)["input_ids"]
        model = trainer.accelerator.unwrap_model(trainer.model)
        # One engine for the run: its slots hold a whole step's completions, its rows the longest prompt allowed.
        engine = self.engines.get(model, len(prompts), self.max_len)
        step = trainer.state.global_step
        # TRL calls a completion truncated (completions/clipped_ratio, grpo.mask_truncated) when its last token is
        # none of its eos_token_ids (the tokenizer's and the generation config's): the engine ends a sample at the
        # same tokens and keeps the one that ended it.
        end_ids = [t for t in trainer.eos_token_ids if t != self.tokenizer.eos_token_id]
        # A group dynamic sampling adds is seeded by its index too: a question drawn again is sampled anew.
        tags = trainer.group_tags or [""] * len(groups)
        requests = [(x, self.sampling(n, end_ids), f"{self.ids_by_prompt.get(p, p)}@{step}{tag}")
                    for x, (p, n), tag in zip(ids, groups, tags, strict=True)]
        was_training = model.training
        model.eval()  # no dropout while sampling
        try:
            done = engine.generate(requests)
        finally:
            model.train(was_training)
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
        for request in done:
            for sample in request.samples:
                out["prompt_ids"].append(list(request.prompt_ids))
                out["completion_ids"].append(list(sample.tokens))
                # Under the model's own distribution (temperature 1): TRL reads them only for off-policy masking and
                # vLLM's importance correction, neither of which lawtune turns on.
                out["logprobs"].append(list(sample.logprobs))
        return out


class GrpoHeldOut(HeldOutEvalCallback):
    """Held-out accuracy in reasoning mode (greedy), before the first step, every grpo.eval_steps and at the end."""

    def settings(self):
        g = self.cfg.grpo
        return (EvalConfig(mode="reasoning", batch_size=g.eval_batch_size),
                GenerationConfig(max_new_tokens=g.eval_max_new_tokens or g.max_completion_length, do_sample=False))

    def folds(self) -> bool:
        return self.cfg.grpo.fold_adapter

    def interval(self) -> int:
        return self.cfg.grpo.eval_steps

    def due(self, step: int, max_steps: int) -> bool:
        # Step 0 too: where the run starts from, the curve's first point and the adapter to beat for best_model/.
        return step == 0 or super().due(step, max_steps)


# ----------------------------------------------------------------------------- main


@dataclass
class GrpoSetup:
    """Everything ``setup`` builds, for ``fit``."""

    cfg: GrpoRun
    """The resolved config (CPU fallbacks applied, output directory filled in): what lawtune_config.yaml records."""
    trainer: Any
    """The LawtuneGRPOTrainer (a class built at run time over TRL's GRPOTrainer)."""
    model: torch.nn.Module
    tokenizer: object
    manifest: dict
    out: Path
    held_out: GrpoHeldOut
    stop: StopOnSigterm


@dataclass
class GrpoResult:
    steps: int
    final_model: str
    start_eval_accuracy: float | None
    best_eval_accuracy: float | None
    final_eval_accuracy: float | None
    eval_history: list[dict]
    output_dir: str


def reward_functions(cfg: GrpoRun) -> tuple[list, list[float]]:
    """The reward functions and their weights; every one is logged (rewards/<name>/mean and /std), weight 0 too."""
    g = cfg.grpo
    funcs = [R.exact_set, R.option_f1, R.answer_format]
    weights = [1.0, g.reward_f1_weight, g.reward_format_weight]
    if g.length_penalty_form == "soft_overlong" and g.overlong_cache:
        funcs.append(R.soft_overlong_penalty(g.max_completion_length, g.overlong_cache, g.length_penalty))
        weights.append(1.0)
    elif g.length_budget:
        funcs.append(R.length_penalty(g.length_budget, g.length_penalty))
        weights.append(1.0)
    return funcs, weights


def load_policy(cfg: GrpoRun, device: torch.device):
    """(model, peft_config): the continued adapter loaded trainable, or the base model and a fresh LoRA's config
    (TRL wraps it; with beta > 0 its reference is then the base model with the adapter switched off)."""
    model = load_base_model(cfg.model, device=device, use_cache=False)
    adapter = cfg.grpo.adapter
    if not adapter:
        return model, lora_config(model, cfg.lora)
    from peft import PeftModel

    check_adapter(adapter, model)
    if cfg.grpo.force:
        log.warning("%s: grpo.force: the adapter's base model is not checked", adapter)
    else:
        check_adapter_base(adapter, model, cfg.model.path)
    return PeftModel.from_pretrained(model, adapter, is_trainable=True), None


def grpo_arguments(cfg: GrpoRun, out: Path, dtype: torch.dtype, device: torch.device, reward_weights: list[float]):
    from trl import GRPOConfig

    g = cfg.grpo
    shared = shared_arguments(g, out, dtype, device)
    # Said either way: TRL's GRPOConfig turns checkpointing on unless told. transformers >= 5.18 calls the field
    # activation_checkpointing and warns at the old name, which 5.17 (the GPU machine's) alone knows.
    shared["gradient_checkpointing"] = g.gradient_checkpointing
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
        return GRPOConfig(
            **shared,
            per_device_train_batch_size=g.per_device_batch_size,
            num_generations=g.num_generations,
            max_completion_length=g.max_completion_length,
            temperature=g.temperature,
            top_p=g.top_p,
            top_k=0,
            beta=g.beta,
            epsilon=g.epsilon,
            epsilon_high=g.epsilon_high,
            loss_type=g.loss_type,
            scale_rewards=g.scale_rewards,
            mask_truncated_completions=g.mask_truncated,
            importance_sampling_level=g.importance_sampling_level,
            reward_weights=reward_weights,
            log_completions=False,
            # The rollout loop and the engine's graphs hold the GPU; pinned host memory buys nothing for string prompts.
            dataloader_pin_memory=False,
            # Under DDP, as `train`: every LoRA weight takes part in each loss pass (the packed pass keeps one
            # sequence where nothing is scored), so no search for unused ones after every backward; and a decoder's
            # buffers (rotary tables) never change, so no broadcast before every forward.
            ddp_find_unused_parameters=False,
            ddp_broadcast_buffers=False,
        )


def setup(cfg: GrpoRun, resume: bool = False, overwrite: bool = False, reward_funcs: list | None = None,
          sigterm: Sigterm | None = None) -> GrpoSetup:
    """Everything before the loop: data and prompts, tokenizer, policy, trainer.

    ``reward_funcs``: TRL-form reward functions (weight 1 each) instead of the config's, e.g. a control reward.
    ``sigterm``: the SIGTERM handler the run stops on (``grpo`` installs one)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sharded = sharded_launch()
    if sharded:
        # Each rank's generation engine samples from the whole live weights, which FSDP and DeepSpeed keep in
        # shards. Gathering them for the rollouts would not lower a rank's peak (the rollouts hold them whole, and
        # under LoRA the rest is small), so it is not written: a model too large for one GPU needs a sharded engine.
        raise UsageError(f"accelerate's distributed_type: grpo runs under DDP only, not {sharded} (its rollouts need "
                         f"the whole weights on every rank); launch with configs/accelerate/ddp.yaml or torchrun")
    # lawtune pins the TRL range it calls rollout_func in; the experimental-API notice is for TRL's own users.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset

    if not cfg.model.path:
        raise ModelError("model.path: no base model given (pass --model DIR or model=DIR)")
    if not cfg.data.train:
        raise ConfigError("data.train: no training file given (pass --data FILE)")
    cfg, out, device, dtype = start_run(cfg, "grpo", resume, overwrite)

    adapter = cfg.grpo.adapter
    trained_with = adapter_prompt_format(adapter) if adapter else None
    if trained_with and trained_with != cfg.data.prompt_format:
        log.warning("%s was trained with data.prompt_format=%s; grpo prompts with %s", adapter, trained_with,
                    cfg.data.prompt_format)
    train_records, eval_records, manifest = prepare_data(cfg, out)
    tokenizer = load_tokenizer(cfg.model.path)
    room = cfg.data.max_length - cfg.grpo.max_completion_length
    prompts, kept, too_long = [], [], []
    for record in train_records:
        text = render_prompt(record, tokenizer, cfg.data.prompt_format, think=True)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > room:
            too_long.append(record.where or record.id)
            continue
        prompts.append(text)
        kept.append(record)
    if too_long:
        log.warning("%d training questions dropped: their prompt is longer than data.max_length - "
                    "grpo.max_completion_length = %d tokens (first: %s)", len(too_long), room, ", ".join(too_long[:3]))
    if not kept:
        raise ConfigError(f"data.max_length: no training prompt fits in {room} tokens beside the completion")
    manifest["prompts"] = {"kept": len(kept), "dropped_too_long": len(too_long)}
    manifest["prompt"] = {"format": cfg.data.prompt_format, "think": True,
                          "instruction": CHAT_INSTRUCTION if cfg.data.prompt_format == "chat" else PLAIN_TEMPLATE,
                          "example": {"id": kept[0].id, "prompt": prompts[0]}}
    dataset = Dataset.from_list([{"prompt": p, "answer": list(r.answer), "letters": "".join(r.options), "id": r.id}
                                 for p, r in zip(prompts, kept)])
    eval_subset = eval_records[: cfg.data.eval_max_samples] if cfg.data.eval_max_samples else eval_records

    model, peft_config = load_policy(cfg, device)
    manifest["base_model"] = base_fingerprint(model, tokenizer)
    manifest["grpo"] = {"continued_adapter": str(Path(adapter).resolve()) if adapter else None,
                        "rollout": cfg.grpo.rollout}
    if adapter and (Path(adapter) / MANIFEST_FILE).is_file():
        # The result was trained on the SFT split too: eval's training-overlap warning must know those questions.
        before = json.loads((Path(adapter) / MANIFEST_FILE).read_text(encoding="utf-8"))
        if before.get("train_statements_key") == STATEMENT_KEY_VERSION:
            manifest["train_statements_sha256"] = sorted(set(manifest["train_statements_sha256"])
                                                         | set(before.get("train_statements_sha256", [])))
    if reward_funcs is None:
        reward_funcs, weights = reward_functions(cfg)
    else:
        weights = [1.0] * len(reward_funcs)

    metrics = MetricsCallback(out / "metrics.jsonl", append=resume)
    held_out = GrpoHeldOut(cfg, eval_subset, tokenizer, metrics, out, manifest)
    rollout = None
    if cfg.grpo.rollout == "engine":
        from ..generation import engine_supported

        if engine_supported(model):
            rollout = EngineRollout(cfg, tokenizer, {p: r.id for p, r in zip(prompts, kept)}, held_out.engines)
        else:
            log.warning("grpo.rollout: the engine cannot run this model (model.attn_implementation=%s); "
                        "sampling with TRL's generation", cfg.model.attn_implementation)
    stop = StopOnSigterm(sigterm or Sigterm())
    callbacks: list = [stop, metrics, held_out, GcPauses()]
    dynamic = None
    if cfg.grpo.dynamic_sampling:
        dynamic = DynamicSampling(cfg.grpo.max_resample, cfg.grpo.seed)
        callbacks.append(SkipEmptySteps())
    trainer = trainer_class()(
        model=model,
        reward_funcs=reward_funcs,
        args=grpo_arguments(cfg, out, dtype, device, weights),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
        rollout_func=rollout,
        dynamic=dynamic,
        packed=cfg.grpo.packed,
    )
    if cfg.grpo.packed and cfg.model.attn_implementation == "flex_attention":
        install_packed_block_mask(trainer.model)  # as `lawtune train` does for its packed rows
    elif cfg.grpo.packed and device.type == "cuda" and cfg.model.attn_implementation not in ONE_ROW_ATTENTION:
        log.info("grpo.packed: model.attn_implementation=%s attends over a whole packed row (a dense mask), so rows "
                 "are only as long as a micro-batch's longest sequence; flex_attention packs a micro-batch into one "
                 "row and attends within each sequence (its document mask)", cfg.model.attn_implementation)
    if cfg.grpo.compile:
        compile_layers(trainer.model)
    held_out.trainer = trainer
    for callback in callbacks:
        if isinstance(callback, SkipEmptySteps):
            callback.trainer = trainer
    if cfg.lora.init in MUTATING_INITS and peft_config is not None and is_main_process():
        save_initial_adapter(trainer.model, out, resume)  # TRL has just made the fresh LoRA
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainable, total = count_parameters(trainer.model)
    log.info("model %s on %s (%s)%s: %s trainable LoRA parameters of %s; rollouts: %s", cfg.model.path, device,
             str(dtype).replace("torch.", ""), f" continuing {adapter}" if adapter else "", f"{trainable:,}",
             f"{total:,}", "engine" if rollout else "trl")
    log.info("data: %d train / %d held-out questions (%d scored in reasoning mode) -> %s", len(kept),
             len(eval_records), len(eval_subset), out / "data")
    return GrpoSetup(cfg=cfg, trainer=trainer, model=trainer.model, tokenizer=tokenizer, manifest=manifest, out=out,
                     held_out=held_out, stop=stop)


def fit(run: GrpoSetup, resume: bool = False) -> GrpoResult:
    trainer, out = run.trainer, run.out
    train_to_the_end(trainer, run.held_out, run.stop, resume_checkpoint(out, resume))
    final = out / "final_model"
    save_model_dir(trainer.model, run.tokenizer, run.cfg, {**run.manifest, FINAL_STEPS: trainer.state.global_step},
                   final, trainer=trainer, card=partial(write_card, run_dir=out))
    if is_main_process():
        write_curves(out / "metrics.jsonl", out / "curves.png", key="rewards/exact_set/mean",
                     label="exact-set reward (rollouts)")
        refresh_cards(out)
    history = run.held_out.history
    return GrpoResult(
        steps=trainer.state.global_step,
        final_model=str(final),
        start_eval_accuracy=history[0]["eval_accuracy"] if history and history[0]["step"] == 0 else None,
        best_eval_accuracy=run.held_out.best if history else None,
        final_eval_accuracy=history[-1]["eval_accuracy"] if history else None,
        eval_history=history,
        output_dir=str(out),
    )


def grpo(cfg: GrpoRun, resume: bool = False, overwrite: bool = False, reward_funcs: list | None = None) -> GrpoResult:
    """Run a whole GRPO job from a config. SIGTERM ends it after the step in progress, with a checkpoint
    (``Preempted``); --resume of a run already at grpo.max_steps raises ``RunFinished``."""
    with Sigterm(what="stopping after this optimizer step") as sigterm:
        return fit(setup(cfg, resume=resume, overwrite=overwrite, reward_funcs=reward_funcs, sigterm=sigterm),
                   resume=resume)
