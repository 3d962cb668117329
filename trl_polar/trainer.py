"""`PolarRewardTrainer`: TRL's RewardTrainer for POLAR reward models (pre-training and fine-tuning).

What changes against `trl.RewardTrainer`:

- the model: a name or path (a causal-LM checkpoint too) becomes a one-label sequence-classification model with the
  POLAR tokens added and a zero value head (`trl_polar.modeling.prepare_reward_model`);
- the data: rows (prompt, reference, chosen, rejected) or (prompt, reference, candidates) go through
  `PolarTemplate`; long rows are truncated the POLAR way (never dropped) and counted;
- the batch: padded (TRL's layout), packed, or shared-prefix (`PolarDataCollator`);
- the loss: Bradley–Terry (with TRL's margin and centering) or listwise Plackett–Luce (`trl_polar.losses`).

`train_from_config` runs a whole job (data, training, saving); the CLI and the example script end there.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import set_seed
from trl import RewardTrainer
from trl.data_utils import get_dataset_column_names
from trl.trainer.utils import global_then_local_main_first

from .collator import PAIR_COLUMNS, RANKING_COLUMN, PolarDataCollator
from .config import PolarConfig
from .data.loading import load_preference_dataset
from .losses import bradley_terry_loss, plackett_luce_loss, ranking_accuracy
from .modeling import prepare_reward_model, value_head
from .movement import MovementCheck
from .segment_attention import Segment, SegmentLayout, flex_available, has_sliding_window, use_segment_attention
from .template import PolarTemplate

logger = logging.getLogger(__name__)

# Attention implementations that build a dense mask for packed rows (so that one group per row is cheapest).
MASK_ATTENTION = ("sdpa", "eager")
# Bits of the `truncated` column: which parts of a row the template cut.
_TRUNCATED_BITS = {"prompt": 1, "reference": 2, "candidate": 4}

MISSING_REFERENCE = (
    "POLAR scores a candidate against a reference answer, so every row needs a `reference` column besides "
    "`prompt`, `chosen` and `rejected` (or `candidates`, best first, for loss_type='listwise'). Convert your data: "
    "for pre-training, sample two answers from one policy (`reference`, `chosen`) and one from another policy "
    "(`rejected`); for a 3-way human ranking use rank 1 as `reference`, rank 2 as `chosen`, rank 3 as `rejected`; "
    "for a dataset with a gold answer (e.g. GSM8K), use it as `reference`, e.g. "
    "`dataset = dataset.rename_column('answer', 'reference')`. Rankings (`prompt` and `responses`, best first) "
    "become such rows with `trl-polar convert-data rows.jsonl --format ranked --out train.jsonl`."
)


class PolarRewardTrainer(RewardTrainer):
    """Trains a POLAR reward model r(prompt, reference, candidate).

    Args:
        model: a hub name or local path (a causal-LM checkpoint is converted), a one-label
            sequence-classification model, or a PEFT model around one.
        args: a `PolarConfig`.
        data_collator: defaults to `PolarDataCollator` with ``args.batching``.
        train_dataset, eval_dataset: rows with ``prompt``, ``reference`` and ``chosen``/``rejected`` (optional
            ``margin``, optional ``wrapper``) or ``candidates`` (best first), strings or message lists; or datasets
            already tokenized by this trainer (``chosen_ids``/``rejected_ids`` or ``candidates_ids``).
        processing_class: the tokenizer; loaded from the model when omitted.
        peft_config: e.g. ``LoraConfig(task_type="SEQ_CLS", ...)``; the adapters and the value head train.

    The other arguments are those of `trl.RewardTrainer`.

    Example::

        trainer = PolarRewardTrainer(model="Qwen/Qwen3-0.6B", args=PolarConfig(output_dir="polar-rm"),
                                     train_dataset=dataset)
        trainer.train()
    """

    _tag_names = ["trl", "reward-trainer", "polar"]
    _name = "POLAR Reward"
    _paper = {
        "title": "Pre-Trained Policy Discriminators are General Reward Models",
        "id": "2507.05197",
        "citation": (
            "@article{dou2025polar,\n    title  = {{Pre-Trained Policy Discriminators are General Reward Models}},\n"
            "    author = {Shihan Dou and others},\n    journal = {arXiv preprint arXiv:2507.05197},\n"
            "    year = 2025\n}"
        ),
    }

    def __init__(
        self,
        model: Any,
        args: PolarConfig | None = None,
        data_collator: Any = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: Any = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: Any = None,
        preprocess_logits_for_metrics: Any = None,
        quantization_config: Any = None,
        peft_config: Any = None,
    ):
        if args is None:
            name = str(model) if isinstance(model, (str, os.PathLike)) else model.config._name_or_path or "model"
            args = PolarConfig(output_dir=f"{os.path.basename(name.rstrip('/'))}-POLAR")
        elif not isinstance(args, PolarConfig):
            raise TypeError(
                f"`args` must be a PolarConfig, got {type(args).__name__}. Build it with "
                "PolarConfig(**your_config.to_dict()) to keep your TrainingArguments fields."
            )
        # Seed before loading: a head that is not zero-initialised is random.
        set_seed(args.seed)
        model, processing_class = self._prepare_model(model, processing_class, args, quantization_config)
        self.template = PolarTemplate(
            processing_class, separator=args.separator, reward_token=args.reward_token, **args.template_kwargs()
        )
        self.batching = self._resolve_batching(model, args)
        if data_collator is None:
            data_collator = PolarDataCollator(
                pad_token_id=processing_class.pad_token_id,
                pad_to_multiple_of=args.pad_to_multiple_of,
                batching=self.batching,
                max_row_length=self._row_length(model, args),
                segment_attention=self._packs_for_segments(model, args),
            )
        # Filled by `_prepare_dataset`, which RewardTrainer.__init__ calls before Trainer.__init__.
        self.truncation_counts: dict[str, dict[str, int]] = {}
        self._truncated_rows = 0
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            peft_config=peft_config,
        )
        self.add_callback(MovementCheck())

    # --------------------------------------------------------------------------------------------------- model
    @staticmethod
    def _prepare_model(model: Any, tokenizer: Any, args: PolarConfig, quantization_config: Any) -> tuple[Any, Any]:
        kwargs: dict[str, Any] = {}
        if isinstance(model, (str, os.PathLike)):
            # TRL loads in float32 unless told otherwise (transformers 5 would use the checkpoint's dtype).
            kwargs = {"dtype": "float32", "trust_remote_code": args.trust_remote_code}
            kwargs.update(args.model_init_kwargs or {})
            if quantization_config is not None:
                if "quantization_config" in kwargs:
                    raise ValueError(
                        "`quantization_config` is set both as a trainer argument and in model_init_kwargs."
                    )
                kwargs["quantization_config"] = quantization_config
        return prepare_reward_model(
            model,
            tokenizer,
            zero_init_head=args.zero_init_head,
            separator=args.separator,
            reward_token=args.reward_token,
            template_kwargs=args.template_kwargs(),
            **kwargs,
        )

    @staticmethod
    def _resolve_batching(model: Any, args: PolarConfig) -> str:
        if args.batching == "shared_prefix" and has_sliding_window(model.config):
            logger.warning(
                "batching='shared_prefix' runs through segment attention, which has no sliding window, and this model "
                "has sliding-window layers: falling back to 'packed' (same results, no prefix reuse)."
            )
            return "packed"
        return args.batching

    def _packs_for_segments(self, model: Any, args: PolarConfig) -> bool:
        # On CUDA, packed rows under sdpa or eager would get a dense block-diagonal mask; one unpadded row through
        # segment attention's flex kernel computes the same with no mask (a model with a varlen kernel keeps it).
        return (
            self.batching == "packed"
            and getattr(model.config, "_attn_implementation", None) in MASK_ATTENTION
            and not has_sliding_window(model.config)
            and flex_available(args.device)
        )

    @staticmethod
    def _row_length(model: Any, args: PolarConfig) -> int | None:
        if args.max_row_length is not None:
            return args.max_row_length
        # sdpa and eager materialise a row-by-row mask, so several groups per row cost more than one row each;
        # varlen kernels (flash attention) gain from long rows.
        if getattr(model.config, "_attn_implementation", None) in MASK_ATTENTION:
            return None
        return 2 * args.max_length

    # ---------------------------------------------------------------------------------------------------- data
    def _prepare_dataset(self, dataset, processing_class, args: PolarConfig, dataset_name: str):
        columns = get_dataset_column_names(dataset)
        if columns is None:  # an IterableDataset without declared features
            columns = list(next(iter(dataset)).keys())
        if RANKING_COLUMN in columns or all(c in columns for c in PAIR_COLUMNS):
            # Already tokenized (by this trainer, or by hand): evaluate() calls this again on prepared data.
            self._check_tokenized(dataset, dataset_name, args)
            return dataset
        ranked = self._check_columns(columns, args, dataset_name)
        template = self.template
        keep = [c for c in ("margin",) if c in columns]

        def tokenize(example: dict, index: int) -> dict:
            wrapper = example.get("wrapper") or args.wrapper
            margin = example.get("margin", 0.0)
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                raise ValueError(
                    f"{dataset_name} dataset, index {index}, column `margin`: must be a finite number, got "
                    f"{margin!r}. Give every row a margin (0.0 for none) or drop the column."
                )
            try:
                if ranked:
                    encodings = template.build_ranking(
                        example["prompt"], example["reference"], example["candidates"], wrapper
                    )
                else:
                    pair = template.build_pair(
                        example["prompt"], example["reference"], example["chosen"], example["rejected"], wrapper
                    )
                    encodings = [pair.chosen, pair.rejected]
            except ValueError as error:
                raise ValueError(f"{dataset_name} dataset, index {index}: {error}") from error
            bits = 0
            for enc in encodings:
                for part, bit in _TRUNCATED_BITS.items():
                    if getattr(enc, part).truncated:
                        bits |= bit
            out = {"truncated": bits}
            if ranked:
                out[RANKING_COLUMN] = [enc.input_ids for enc in encodings]
            else:
                out[PAIR_COLUMNS[0]], out[PAIR_COLUMNS[1]] = encodings[0].input_ids, encodings[1].input_ids
            return out

        map_kwargs: dict[str, Any] = {
            "with_indices": True,
            "remove_columns": [c for c in columns if c not in keep],
        }
        if isinstance(dataset, Dataset):
            map_kwargs.update(num_proc=args.dataset_num_proc, desc=f"Tokenizing {dataset_name} dataset (POLAR)")
        with global_then_local_main_first():
            dataset = dataset.map(tokenize, **map_kwargs)
        if isinstance(dataset, Dataset):
            self._log_truncation(dataset, dataset_name, args)
        return dataset

    def _check_columns(self, columns: list[str], args: PolarConfig, dataset_name: str) -> bool:
        if "reference" not in columns:
            raise ValueError(
                f"The {dataset_name} dataset has columns {columns} but no `reference`. {MISSING_REFERENCE}"
            )
        if "prompt" not in columns:
            raise ValueError(
                f"The {dataset_name} dataset has no `prompt` column (columns: {columns}). POLAR needs the prompt "
                "separately from the answers; rename your question column, e.g. dataset.rename_column('question', "
                "'prompt')."
            )
        ranked = "candidates" in columns
        if not ranked and not all(c in columns for c in ("chosen", "rejected")):
            raise ValueError(
                f"The {dataset_name} dataset needs `chosen` and `rejected` columns (or `candidates`, a best-first "
                f"list, with loss_type='listwise'); it has {columns}."
            )
        if ranked and args.loss_type != "listwise":
            raise ValueError(
                f"The {dataset_name} dataset has a `candidates` ranking column: set loss_type='listwise' "
                "(Plackett-Luce), or convert each ranking to (chosen=rank 2, rejected=rank 3) pairs with rank 1 as "
                "reference."
            )
        if "margin" in columns and args.loss_type == "listwise":
            raise ValueError(
                f"The {dataset_name} dataset has a `margin` column, which only loss_type='bradley_terry' uses. Remove "
                "the column or switch the loss."
            )
        return ranked

    def _check_tokenized(self, dataset, dataset_name: str, args: PolarConfig) -> None:
        if not isinstance(dataset, Dataset):
            return
        columns = [RANKING_COLUMN] if RANKING_COLUMN in dataset.column_names else list(PAIR_COLUMNS)
        if RANKING_COLUMN in columns and args.loss_type != "listwise":
            raise ValueError(f"The {dataset_name} dataset holds `{RANKING_COLUMN}`: set loss_type='listwise'.")
        reward_id = self.template.reward_token_id
        for column in columns:
            for index, value in enumerate(dataset[column]):
                sequences = value if column == RANKING_COLUMN else [value]
                if any(not seq or seq[-1] != reward_id for seq in sequences):
                    raise ValueError(
                        f"{dataset_name} dataset, index {index}, column `{column}`: the sequence does not end with "
                        f"the reward token {self.template.reward_token!r} (id {reward_id}). Tokenize rows with "
                        "PolarTemplate.encode / encode_pair, or pass text columns (prompt, reference, chosen, "
                        "rejected) and let the trainer tokenize them."
                    )

    def _log_truncation(self, dataset: Dataset, dataset_name: str, args: PolarConfig) -> None:
        flags = dataset["truncated"]
        counts = {"rows": len(flags), "truncated_rows": sum(1 for f in flags if f)}
        counts.update({part: sum(1 for f in flags if f & bit) for part, bit in _TRUNCATED_BITS.items()})
        self.truncation_counts[dataset_name] = counts
        if counts["truncated_rows"]:
            logger.warning(
                "%d of %d %s rows were truncated to fit max_length=%d / max_response_length=%d (rows with a cut "
                "prompt: %d, reference: %d, candidate: %d). No row was dropped; raise these limits to keep more text.",
                counts["truncated_rows"],
                counts["rows"],
                dataset_name,
                args.max_length,
                args.max_response_length,
                counts["prompt"],
                counts["reference"],
                counts["candidate"],
            )

    def _set_signature_columns_if_needed(self):
        # RewardTrainer keeps only chosen_ids/rejected_ids/margin; the ranking and truncation columns must survive
        # remove_unused_columns too.
        if self._signature_columns is None:
            self._signature_columns = [*PAIR_COLUMNS, RANKING_COLUMN, "margin", "truncated"]

    # ---------------------------------------------------------------------------------------------------- loss
    def sequence_rewards(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The flat vector of rewards of a collated batch, one per sequence (see `PolarDataCollator`)."""
        batch = dict(batch)
        if "attention_mask" in batch:  # padded: the model's own last-token pooling, exactly as TRL
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            return outputs.logits.squeeze(-1)
        unwrapped = self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model
        positions = batch["reward_positions"]
        attention = contextlib.nullcontext()
        if "segments" in batch:
            # Shared prefixes: one unpadded row through segment attention, each branch attending to its prefix and
            # itself (no padding, no dense mask).
            segments = [Segment(*s) for s in batch["segments"].tolist()]
            layout = SegmentLayout(segments, batch["input_ids"].device)
            kwargs = {
                "input_ids": batch["input_ids"],
                "position_ids": layout.position_ids,
                "segment_layout": layout,
                "use_cache": False,
            }
            attention = use_segment_attention(unwrapped.config)
        else:
            kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        # Sequence-classification pooling reads only each row's last token, so the per-token rewards are taken from
        # the value head as it runs. The forward still goes through `model` (not model.model + head): DDP, DeepSpeed
        # and FSDP synchronise gradients and gather sharded weights only in the wrapper's forward.
        captured: list[torch.Tensor] = []
        handle = value_head(unwrapped).register_forward_hook(lambda module, inputs, output: captured.append(output))
        try:
            with attention:
                model(**kwargs)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"Expected the value head to run once per forward, it ran {len(captured)} times.")
        return captured[0].reshape(-1)[positions]

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Gradient checkpointing recomputes each layer's forward during the backward, after `sequence_rewards` has
        # left its attention switch: the switch must hold across the backward too, or the recomputation runs another
        # attention function and torch's checkpoint refuses the mismatch.
        attention = contextlib.nullcontext()
        if "segments" in inputs:
            attention = use_segment_attention(self.accelerator.unwrap_model(model).config)
        with attention:
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        index = inputs.pop("candidate_index")
        margin = inputs.pop("margin", None)
        truncated = inputs.pop("truncated", None)
        sequence_tokens = inputs.pop("sequence_tokens")
        flat = self.sequence_rewards(model, inputs)
        valid = index >= 0
        rewards = flat[index.clamp(min=0)].masked_fill(~valid, 0.0)
        if self.args.loss_type == "bradley_terry":
            if rewards.shape[1] != 2:
                raise ValueError(
                    f"loss_type='bradley_terry' needs pairs; the batch has rankings of {rewards.shape[1]}."
                )
            loss = bradley_terry_loss(rewards[:, 0], rewards[:, 1], margin, self.args.center_rewards_coefficient)
        else:
            loss = plackett_luce_loss(rewards, valid, self.args.center_rewards_coefficient)
        self._log_batch_metrics(mode, rewards.detach(), valid, sequence_tokens, truncated)
        if return_outputs:
            return loss, {"rewards": rewards.detach().masked_fill(~valid, float("nan"))}
        return loss

    def _log_batch_metrics(self, mode, rewards, valid, sequence_tokens, truncated) -> None:
        gather = self.accelerator.gather_for_metrics
        if mode == "train":
            self._total_train_tokens += gather(sequence_tokens.sum()).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            # Per-process (min, sum, count, max) so that batches of different sizes gather without padding.
            values = rewards[valid]
            stats = torch.stack([values.min(), values.sum(), values.new_tensor(values.numel()), values.max()])
            stats = self.accelerator.gather(stats[None]).reshape(-1, 4)
            self._metrics[mode]["min_reward"].append(stats[:, 0].min().item())
            self._metrics[mode]["mean_reward"].append((stats[:, 1].sum() / stats[:, 2].sum()).item())
            self._metrics[mode]["max_reward"].append(stats[:, 3].max().item())
            accuracy = ranking_accuracy(rewards, valid).mean()
            self._metrics[mode]["accuracy"].append(gather(accuracy).mean().item())
            last = valid.sum(dim=1) - 1
            margin = (rewards[:, 0] - rewards.gather(1, last[:, None]).squeeze(1)).mean()
            self._metrics[mode]["margin"].append(gather(margin).mean().item())
            if truncated is not None:
                count = gather(truncated.sum()).sum().item()
                rows = gather(truncated.new_tensor(truncated.numel(), dtype=torch.long)).sum().item()
                self._metrics[mode]["truncated_fraction"].append(count / max(rows, 1))
                if mode == "train":
                    self._truncated_rows += count
                    self._metrics[mode]["truncated_rows"] = [self._truncated_rows]

    # ---------------------------------------------------------------------------------------------------- save
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model and tokenizer (collective under ZeRO-3: call it on every rank) and, on the main process,
        a model card; the directory loads with AutoModelForSequenceClassification and PolarTemplate.from_pretrained."""
        super().save_model(output_dir, _internal_call=_internal_call)
        target = output_dir or self.args.output_dir
        if not _internal_call and os.path.abspath(target) == os.path.abspath(self.args.output_dir):
            self.create_model_card(model_name=os.path.basename(os.path.abspath(target)))


def lora_config(
    r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: str | list[str] = "all-linear"
) -> Any:
    """A `peft.LoraConfig` for reward models: task type SEQ_CLS, so the value head trains with the adapters."""
    from peft import LoraConfig

    return LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)


def train_from_config(
    config: PolarConfig,
    model: str,
    train_data: str,
    eval_data: str | None = None,
    *,
    train_split: str = "train",
    eval_split: str = "train",
    peft_config: Any = None,
) -> Any:
    """Load the data, train, save the final model to ``config.output_dir`` and return the trainer.

    Args:
        config: the training configuration; ``resume_from_checkpoint`` is honoured.
        model: hub name or local path of the backbone (causal LM) or of a POLAR reward model to fine-tune.
        train_data, eval_data: see `trl_polar.data.loading.load_preference_dataset`.
        train_split, eval_split: splits to load (a single local file is the 'train' split).
        peft_config: e.g. `lora_config()`; trains adapters and the value head.

    Works unchanged under ``accelerate launch`` (DDP, DeepSpeed ZeRO-2/3): every rank calls it, and saving is
    collective.
    """
    train_dataset = load_preference_dataset(train_data, train_split)
    eval_dataset = load_preference_dataset(eval_data, eval_split) if eval_data else None
    trainer = PolarRewardTrainer(
        model=model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset, peft_config=peft_config
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    # Every rank must call save_model: under ZeRO-3 it gathers the sharded weights collectively.
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        logger.info("Saved the POLAR reward model to %s", config.output_dir)
    return trainer
