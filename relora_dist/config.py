"""Typed run configuration: dataclasses, YAML presets, `--section.key=value` overrides.

The checks of a loaded config live with the modules that own each rule; relora_dist/validation.py
runs them in order (this module imports none of them, so every owner may import it).

Every field has a docstring right under it; `field_docs()` reads those docstrings from this file's
source so `launchers/pretrain.py --help` documents every key with its default.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_TARGETS: list[str] = [r"self_attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)_proj$"]
"""relora.targets' default: every attention and MLP projection of a LLaMA decoder layer."""


class ConfigError(ValueError):
    """A one-line configuration problem that names the fix."""


# The keys that take one of a few words are typed with their words: loading refuses any other word
# (_coerce), and check_choices applies the same rule to a Config built in code, so the owners'
# checks keep only the rules that join several keys. The tuples are the words, in the order the
# error lists them.
Precision = Literal["fp32", "bf16", "auto"]
OnNonfinite = Literal["stop", "skip"]
OptimizerName = Literal["adamw", "adamw8bit", "sgd"]
OptimizerImpl = Literal["fused", "foreach"]
PruneThreshold = Literal["kthvalue", "quantile"]
Reinit = Literal["random", "gradient", "project"]
WarmStartSchedule = Literal["paper", "reference", "anneal"]
AutoTrueFalse = Literal["auto", "true", "false"]
MergePrecision = Literal["fp32", "bf16"]
MergeMasterDevice = Literal["device", "cpu"]
BaseQuant = Literal["none", "nf4", "int8"]
QuantComputeDtype = Literal["auto", "bf16", "fp32"]
QuantMerge = Literal["master", "reference"]
PhaseStage = Literal["same", "3"]
OPTIMIZERS = typing.get_args(OptimizerName)
PRUNE_THRESHOLDS = typing.get_args(PruneThreshold)
REINITS = typing.get_args(Reinit)
WARM_START_SCHEDULES = typing.get_args(WarmStartSchedule)
BASE_QUANT = typing.get_args(BaseQuant)
QUANT_MERGE = typing.get_args(QuantMerge)


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """LLaMA-style size preset: tiny, 20m, 60m, 130m, 250m, 350m, 1b3 (see relora_dist/model.py)."""
    init_from: str = ""
    """Hugging Face model folder to load weights from instead of a random init ('' = random)."""
    hidden_size: int = 0
    """Override the preset's hidden size (0 = preset); e.g. for the paper's "control" baseline."""
    intermediate_size: int = 0
    """Override the preset's MLP size (0 = preset)."""
    num_layers: int = 0
    """Override the preset's layer count (0 = preset)."""
    num_heads: int = 0
    """Override the preset's attention head count (0 = preset)."""


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=list)
    """Text/jsonl/jsonl.xz/parquet files to train on; empty = the bundled corpus in assets/corpus."""
    tokenizer_dir: str = ""
    """Tokenizer folder: SentencePiece (tokenizer.model) or Hugging Face (tokenizer.json); empty = the
    model.init_from folder's own tokenizer when it holds one, else the bundled assets/tokenizer."""
    prepared_dir: str = ""
    """Already-prepared data folder (tools/prepare_data.py output); overrides sources when set."""
    cache_dir: str = ".cache/data"
    """Where sources are tokenized and packed on first use (relative paths: to the working dir)."""
    prepare_timeout_s: float = 1800.0
    """Preparing on first use in a multi-rank run: seconds the ranks other than each node's local
    rank 0 (which prepares) wait for the folder before stopping with a line that says to run
    relora-prepare-data beforehand (no collective waits on preparation). 1800 s is ~18 GB of text at
    the ~10 MB/s one process tokenizes; past that, preparing apart frees the accelerators."""
    seq_len: int = 128
    """Tokens per training sequence (packed block length)."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation."""


@dataclass
class TrainConfig:
    max_steps: int = 300
    """Total optimizer steps of the run, warm start and ReLoRA phases together."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all ranks (= micro_batch_size x grad_accum x world size)."""
    micro_batch_size: int = 8
    """Sequences per forward pass on one rank; grad_accum is derived from the global batch."""
    precision: Precision = "auto"
    """fp32, bf16, or auto (bf16 on GPUs that support it, fp32 on CPU)."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    eval_every: int = 50
    """Run validation every N steps (and at the end); 0 = only at the end."""
    eval_tokens: int = 32768
    """Validation budget in tokens per evaluation, split over ranks."""
    seed: int = 0
    """Seed of the model init, the data order, adapter draws and random pruning."""
    on_nonfinite: OnNonfinite = "stop"
    """A step whose loss or gradient norm is inf/NaN on any rank: stop (exit 3 at once, nothing
    saved: the newest checkpoint stays the last finite one) or skip (no optimizer update, the step
    is counted in train/skipped_steps; stops after train.max_skipped_steps such steps in a row)."""
    max_skipped_steps: int = 10
    """With on_nonfinite=skip: consecutive non-finite steps tolerated before the run stops."""
    compile: bool = False
    """torch.compile each decoder layer in place (relora_dist/runtime/compile.py) under ZeRO-2, ZeRO-3 (its
    gather hooks split each layer into several graphs) and FSDP2; refused with relora.base_quant.
    Recompiles once at the switch to ReLoRA, never at a reset; the first steps of each phase pay
    the compilation (about a minute on 2 CPU cores). Losses within 1e-5 of eager in fp32. Off by
    default: it cuts the operator launches per step (350m structure, ZeRO-2: 3,448 -> 1,560 at
    full rank) but its wall time is not measured on a GPU yet; docs/benchmarks.md ("Compiled
    decoder blocks")."""


@dataclass
class OptimizerConfig:
    name: OptimizerName = "adamw"
    """adamw (torch.optim.AdamW, decoupled decay), adamw8bit (bitsandbytes AdamW8bit: blockwise
    8-bit moments, 2 bytes of state per parameter instead of 8; ZeRO-2 and FSDP2) or sgd (torch.optim.SGD, momentum 0.9, L2 weight
    decay; a baseline). ReLoRA's optimizer reset prunes Adam moments: with sgd set
    relora.optimizer_reset=none."""
    lr: float = 3e-3
    """Peak learning rate of the full-rank (warm-start) phase."""
    weight_decay: float = 0.0
    """Weight decay (AdamW: decoupled; sgd: L2); applied to norms and biases only with decay_1d."""
    decay_1d: bool = False
    """Decay parameters with fewer than 2 dimensions (norm weights, biases) too, as the reference
    does (torchrun_main.py passes every trainable parameter to one AdamW group). false (default):
    matrices and embeddings only, the common practice of GPT-2/nanoGPT (configure_optimizers) and
    the Hugging Face Trainer (no decay for biases and LayerNorm weights): decaying a norm's gain
    pulls it toward 0, not toward its init of 1. No effect with weight_decay=0 (the reference's and
    the presets' value)."""
    beta1: float = 0.9
    """AdamW beta1 (unused by sgd)."""
    beta2: float = 0.95
    """AdamW beta2 (unused by sgd)."""
    eps: float = 1e-8
    """AdamW epsilon (unused by sgd)."""
    implementation: OptimizerImpl = "fused"
    """How torch.optim.AdamW steps: fused (one kernel for all of a group's tensors; torchtitan's
    and the Hugging Face Trainer's default) or foreach (one launch per update op and group, plus
    two host reads of the step count per tensor). Under FSDP2 AdamW steps every parameter shard
    as its own tensor: at the 350m structure, 2 ranks, fused takes a ReLoRA step's optimizer from
    803 to 17 operator launches (docs/benchmarks.md, "Operator launches per step"). Under ZeRO it
    steps a few flat partitions either way. The two agree to float rounding (a few ulp per step);
    foreach gives per-step losses bitwise those of torch's default CPU AdamW. No effect on
    adamw8bit or sgd."""


@dataclass
class ScheduleConfig:
    warmup_steps: int = 20
    """Linear warmup of the full-rank phase (steps)."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak, for both phases' cosine envelopes."""


@dataclass
class ReLoRAConfig:
    enabled: bool = True
    """Switch to ReLoRA after the warm start; false = plain full-rank training for max_steps."""
    warm_start_steps: int = 100
    """Full-rank steps before the switch (paper: 1/3 of the run at 1.3B); 0 = no warm start."""
    r: int = 32
    """Adapter rank per reset (paper: 128)."""
    alpha: float = 32.0
    """Adapter scale numerator: s = alpha / r (reference: 32)."""
    dropout: float = 0.0
    """Dropout on the adapter input (reference: 0.1)."""
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Regexes (re.search) over module names selecting the Linear layers to wrap."""
    train_extra: bool = True
    """Keep embeddings, norms and lm_head trainable in ReLoRA phases (paper: yes)."""
    cycle_length: int = 50
    """Steps between resets (merge, re-init, optimizer prune, LR restart)."""
    first_warmup: int = 10
    """Linear LR warmup at the start of the ReLoRA phase (steps)."""
    restart_warmup: int = 5
    """Linear LR re-warm after each reset (steps); the paper's ablation diverges without it."""
    lr: float = 0.0
    """Peak LR of the ReLoRA phase; 0 = 2 x optimizer.lr (reference README: ~2x the full-rank LR).
    Sweep it: on the replication table (hidden 256, seed 0) every adapter row was best at 8x the
    full-rank LR, 4x this default (eval perplexity ReLoRA 96.38 -> 82.11, LoRA 88.77 -> 75.46)."""
    resets: bool = True
    """Merge and restart every cycle_length steps; false = plain LoRA after the warm start."""
    min_reset_lr_ratio: float = 0.0
    """Reset only while the LR a reset's restart warmup ramps back to is at least this fraction of
    the ReLoRA phase's peak; after the last such reset the adapter trains on without merges or LR
    restarts (LoRA from there). 0 = a reset every cycle, the paper's. Why: at the tuned
    relora.lr=1.6e-2 of the replication table (3 seeds, reinit=gradient), ReLoRA pulled ahead of
    LoRA over the resets at 75% and 57% of the peak and lost ground at every one below (38%, 23%,
    13%): a new adapter (B = 0) learns little at a low LR. At 0.5 (those two resets kept) eval
    perplexity went 1.034x -> 0.998x full rank (LoRA 1.007x), random re-init 1.073x -> 1.018x.
    The default stays 0, the paper's and what earlier runs and checkpoints used."""
    optimizer_reset: str = "magnitude"
    """Prune of the adapters' Adam moments at each reset: zero, random, magnitude, or none."""
    prune_ratio: float = 0.9
    """Fraction of moment entries pruned by random/magnitude reset (paper: 0.99; >0.9 is flat)."""
    prune_threshold: PruneThreshold = "kthvalue"
    """Magnitude reset's per-tensor threshold t (entries with |m| > t are kept). kthvalue: the
    ceil(p*n)-th smallest |m|, so exactly ceil(p*n) entries are pruned (without ties). quantile:
    torch.quantile(|m|, p)'s linear interpolation, as the reference (training_utils.py
    magnitude_pruning_), which prunes floor(p*(n-1)) + 1: one entry fewer per tensor when the
    fractional part of p*n is below p (at p=0.99: every adapter tensor of the paper presets, e.g.
    129761 against 129762 of a 128 x 1024 lora_A), computed from order statistics so it has no 2^24-element limit (a
    2^24-element tensor on one CPU core: 0.32 s against kthvalue's 0.29 s and torch.quantile's
    2.2 s). The default stays kthvalue, what earlier runs and checkpoints used: the two differ by
    at most one entry per tensor (1/n of it)."""
    reinit: Reinit = "random"
    """How each reset re-initialises the adapter (B = 0 in all three). random: A Kaiming-uniform,
    drawn from (seed, restart index, module); the paper and reference. gradient: A = the top-r right
    singular vectors of the frozen weight's gradient at the reset (GaLore's and LoRA-GA's subspace),
    scaled to random A's row norm; sketched during the cycle's last step (at LR 0: the gradient at
    the reset point), so no extra forward or backward. project: A as gradient, and instead of
    optimizer_reset's pruning B's Adam moments are projected into the new subspace and A's zeroed.
    The first adapter (at the switch) is random in all three. Replication table (3 seeds, 5 resets):
    the gap to LoRA grows per reset by 0.0170 nats (random), 0.0075 (gradient), 0.0073 (project);
    eval perplexity 1.241x, 1.183x, 1.182x full rank (LoRA 1.139x). The default stays random, the
    paper's and what earlier runs and checkpoints used."""
    reinit_micro_batches: int = 0
    """gradient/project: how many of each rank's micro-batches of the cycle's last step feed the
    gradient estimate (0 = all: the whole global batch, free of extra passes; the sketch costs
    ~(in + out) x 6r multiply-adds per token and wrapped linear on those micro-batches only)."""
    warm_start_schedule: WarmStartSchedule = "paper"
    """paper: one warmup + cosine envelope over the whole run (train.max_steps); the switch comes
    mid-schedule near the peak LR and the ReLoRA phase re-warms up to the same envelope after the
    switch and after every reset (the reference's cosine_restarts shape). reference: the reference
    repository's two runs as its README says the paper ran them: the warm start as paper's (a cosine
    over the whole run, stopped at the switch), then a fresh jagged cosine over the ReLoRA phase
    alone, from the peak again (multiplier up to 0.15-0.22 above paper's on the 60m/130m/350m paper
    presets, 0.31 on the default run). anneal: the warm start is a complete warmup + cosine down to
    min_lr_ratio, then the same fresh jagged cosine as reference. Default run (one seed, final eval
    perplexity): paper 75.81, reference 71.69 (73.40 with carry_optimizer_state=false), anneal
    75.52. The default stays paper, what earlier
    runs and checkpoints used (a resume refuses a change), until more seeds and sizes confirm."""
    lr_restarts: AutoTrueFalse = "auto"
    """auto: the LR restarts from 0 after every reset (the jagged cosine) and only then; true: the
    same jagged LR also when relora.resets=false (the LoRA baseline with ReLoRA's LR, which
    separates what the LR restarts cost from what the merges and pruning cost); false: no restart
    warmup after resets (the paper's ablation: training diverges)."""
    carry_optimizer_state: AutoTrueFalse = "auto"
    """true: at the switch, move the Adam moments and step count of every parameter that stays
    trainable (embeddings, norms, lm_head with train_extra) into the ReLoRA engine's optimizer;
    false: start them from zero like the reference's separate warm-start run; auto: true when the
    run has an AdamW warm start (not with optimizer.name=sgd or relora.warm_start_steps=0)."""
    merge_precision: MergePrecision = "fp32"
    """fp32: merge into an fp32 master of the frozen weights; bf16: merge straight into bf16
    compute weights like the reference (rounding accumulates over resets)."""
    merge_master_device: MergeMasterDevice = "device"
    """Where the fp32 merge masters live: device (the accelerator) or cpu (pinned host memory on
    GPUs, so the accelerator holds only the bf16 weights and the trainable state; each merge copies
    one slice at a time). Needs merge_precision=fp32 (with bf16 merges there is no master)."""
    base_quant: BaseQuant = "none"
    """none, nf4 or int8: from the switch on, hold each frozen wrapped weight as a bitsandbytes
    4-bit NF4 (block 64) or 8-bit (row-wise) replica; the adapters train in the compute precision.
    Each reset merges into the fp32 masters and requantizes from them (relora.quant_merge), so the
    quantized weight is always quantize(master). Needs merge_precision=fp32 and ZeRO-2 or ZeRO-3
    (there a whole replica per rank: less memory than ZeRO-3's bf16 shards only below 4 ranks)."""
    quant_double_quant: bool = True
    """nf4 only: quantize the per-block absmax to 8 bits too (QLoRA's double quantization,
    bitsandbytes' compress_statistics), 0.516 instead of 0.5625 bytes per weight: -14 MB per rank at
    350m. Measured on a 2736 x 1024 N(0, 0.02) weight: relative error 0.09201 against 0.09199."""
    quant_compute_dtype: QuantComputeDtype = "auto"
    """Dtype the quantized base is dequantized to for its matmul: auto (the training precision),
    bf16 or fp32."""
    quant_merge: QuantMerge = "master"
    """master: requantize from the fp32 master at each reset; reference: dequantize, add s*B*A,
    requantize (the reference implementation's 4-bit merge; its error compounds over resets: kept
    to measure that)."""
    phase_stage: PhaseStage = "same"
    """ZeRO stage of the ReLoRA phase: same (as the warm start) or 3. A ZeRO-2 warm start with 3
    shards the frozen bf16 weights too; ZeRO-2 keeps them replicated on every rank, which at many
    ranks costs more than the optimizer state the ReLoRA phase frees (see --dry_run's memory plan)."""
    effective_rank_every: int = 0
    """Measure the effective rank of W_now - W_switch every N steps via SVD on rank 0 (0 = at resets
    only; -1 = never, and no W_switch snapshot is kept: 4 bytes per frozen weight / world, CPU RAM)."""


@dataclass
class LoggingConfig:
    log_every: int = 10
    """Print a console line every N steps."""
    tensorboard: bool = True
    """Write TensorBoard scalars under run.output_dir/tb."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for MFU; 0 = a guess from the hardware (989e12 on H100/H200 bf16)."""
    progress_bar: bool = True
    """Show a tqdm bar on rank 0."""


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    """Run directory: config.yaml, TensorBoard logs, exported models."""
    export_warm_start: bool = True
    """Save the warm-started model as a Hugging Face folder at the switch (reusable via model.init_from)."""


@dataclass
class CheckpointConfig:
    save_every: int = 0
    """Save a sharded checkpoint every N steps (0 = only at the end and on SIGTERM)."""
    keep_last: int = 3
    """Keep the newest K checkpoints (0 = keep all)."""
    resume: str = "auto"
    """'auto' = continue from the latest checkpoint of this same run if there is one (a requeued
    cluster job just reruns its command); 'previous' = from the newest checkpoint that verifies
    (every sha256 checked; skips a damaged newest one); a step_* directory = continue from it;
    '' = always start a new run (refused if checkpoints exist)."""
    allow_changes: list[str] = field(default_factory=list)
    """Settings that may differ from the resumed checkpoint's (e.g. optimizer.lr,relora.lr); a resume
    that changes any other setting which changes the trajectory is refused (see docs/reliability.md)."""
    overwrite: bool = False
    """Start a new run and delete the checkpoints already in checkpoint.dir (refused otherwise)."""
    dir: str = ""
    """Checkpoint folder; empty = run.output_dir/checkpoints."""


@dataclass
class ParallelConfig:
    backend: str = "auto"
    """Training engine: zero2 or zero3 (DeepSpeed, configured by --ds_config), fsdp2 (PyTorch
    sharding per decoder layer; of --ds_config it takes only batch sizes, clipping and bf16), or
    auto = the ZeRO stage of --ds_config."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    relora: ReLoRAConfig = field(default_factory=ReLoRAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def relora_lr(self) -> float:
        return self.relora.lr if self.relora.lr > 0 else 2.0 * self.optimizer.lr

    @property
    def relora_steps(self) -> int:
        return self.train.max_steps - self.relora.warm_start_steps if self.relora.enabled else 0


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}
SECTIONS = {name: typing.get_type_hints(Config)[name] for name in SECTIONS}


def field_docs() -> dict[str, str]:
    """{"section.key": docstring} read from the string literal under each field in this file."""
    docs: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
                if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                    docs[f"{section}.{node.target.id}"] = " ".join(nxt.value.value.split())
    return docs


def suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(sorted(options))}"


def choice_error(key: str, value: Any, words: tuple[str, ...]) -> str | None:
    """The one-line problem of a word-valued key holding another word, or None."""
    if value in words:
        return None
    listing = " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else list(words))
    close = difflib.get_close_matches(str(value), words, n=1, cutoff=0.6)
    return f"{key} '{value}' unknown: use {listing}" + (f" (did you mean '{close[0]}'?)" if close else "")


def check_choices(cfg: Config) -> None:
    """Every word-valued key holds one of its words (a Config built or changed in code skips _coerce)."""
    for section, cls in SECTIONS.items():
        for key, typ in typing.get_type_hints(cls).items():
            if typing.get_origin(typ) is Literal:
                problem = choice_error(f"{section}.{key}", getattr(getattr(cfg, section), key), typing.get_args(typ))
                if problem:
                    raise ConfigError(problem)


def _coerce(key: str, value: Any, typ: Any, example: Any = None) -> Any:
    """Check/convert one YAML- or CLI-parsed value against the dataclass field type."""
    eg = f"; write e.g. {key}={example}" if example not in (None, "", []) else ""
    origin = typing.get_origin(typ)
    if origin is Literal:
        value = _coerce(key, value, str, example)
        problem = choice_error(key, value, typing.get_args(typ))
        if problem:
            raise ConfigError(problem)
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}; write a YAML list or a,b,c")
        return [str(v) for v in value]
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}; write {key}=true or {key}=false")
    if typ is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}{eg}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}{eg}")
        return float(value)
    if typ is str:
        if isinstance(value, bool):  # YAML reads true/false (auto|true|false keys) as booleans
            return "true" if value else "false"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}{eg}")
        return "" if value is None else str(value)
    raise ConfigError(f"{key}: unsupported type {typ}")  # pragma: no cover - programming error


def _set(cfg: Config, dotted: str, value: Any) -> None:
    sub, key, typ = _field(cfg, dotted)
    setattr(sub, key, _coerce(dotted, value, typ, getattr(type(sub)(), key)))


def _field(cfg: Config, dotted: str) -> tuple[Any, str, Any]:
    """(section object, key, type) of `section.key`; ConfigError naming the fix if there is none."""
    if "." not in dotted:
        raise ConfigError(
            f"'{dotted}' is not of the form section.key; sections: {', '.join(SECTIONS)}"
        )
    section, key = dotted.split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section '{section}': {suggest(section, list(SECTIONS))}")
    sub = getattr(cfg, section)
    hints = typing.get_type_hints(type(sub))
    if key not in hints:
        raise ConfigError(f"unknown config key '{dotted}': {suggest(key, list(hints))}")
    return sub, key, hints[key]


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (a path, or a bundled preset's name such as `60m_paper`) <- `section.key=value`
    overrides (values parsed as YAML scalars)."""
    cfg = Config()
    if path:
        from relora_dist import resources

        p = Path(resources.resolve(path, "configs", ".yaml"))  # a file, or a bundled preset's name
        if not p.is_file():
            raise ConfigError(f"config file '{path}' not found; pass an existing YAML or a bundled preset's "
                              f"name: {', '.join(resources.bundled('configs', '.yaml'))}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}")
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must map sections to keys, got {type(data).__name__}")
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"config section '{section}' in '{path}' must be a mapping")
            for key, value in values.items():
                _set(cfg, f"{section}.{key}", value)
    for item in overrides or []:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override '{item}' needs a value: write --{item}=VALUE")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:  # not a ValueError: it would escape the one-line error handlers
            sub, name, _ = _field(cfg, key)  # an unknown key is the first thing to fix
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            default = getattr(type(sub)(), name)
            example = ",".join(default) or "a,b" if isinstance(default, list) else default
            raise ConfigError(f"--{key}={raw}: the value is not valid YAML ({problem}); write a plain value "
                              f"(e.g. --{key}={example}), or quote text that must keep these characters "
                              f"(--{key}='\"{raw}\"')") from None
        _set(cfg, key, value)
    return cfg



def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with --config)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def help_text() -> str:
    """Every key with its default and docstring, for --help."""
    defaults = to_dict(Config())
    lines = []
    for dotted, doc in field_docs().items():
        section, key = dotted.split(".")
        lines.append(f"  --{dotted}={defaults[section][key]!r}\n      {doc}")
    return "\n".join(lines)
