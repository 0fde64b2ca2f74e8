"""Multi-process LoPT on CPU (gloo, 2 processes, 1 thread each): data-parallel (DDP) and block-parallel.

Each multi-process scenario runs this file as a torchrun worker script (`python -m torch.distributed.run ...
tests/test_distributed.py SCENARIO OUT_DIR`); the pytest side compares what the workers wrote with a single-process
run on the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # conftest helpers, also when this file runs as a torchrun worker

from conftest import make_batch, tiny_model  # noqa: E402

STEPS = 3
LR = 1e-2
SEQ = 8


# --- shared by the workers and the single-process references ----------------------------------------------------
def lopt_model_for(backward: str, tie: bool = False):
    """The tiny Llama wrapped for LoPT k=2; `tie=True`: its embedding and LM head are one matrix (LoPT's default keeps
    it so: DDP syncs it with the late parameters, FSDP2 shards it in the root unit)."""
    from lopt import LoPTConfig, get_lopt_model

    model = tiny_model(
        "llama", seed=0, tie=tie
    )  # seeds the RNG: the aux heads built next are the same in every process
    return get_lopt_model(model, LoPTConfig(num_blocks=2, backward=backward))


# Variants of the library scenarios: name -> (backward, tied embedding and LM head)
LIBRARY_VARIANTS = {"local": ("local", False), "joint": ("joint", False), "tied": ("local", True)}


def moved_prefixes(weights: dict) -> tuple[str, ...]:
    """Parameters that must have moved in a run (a tied model has no lm_head.weight of its own)."""
    head = ("lm_head",) if any(n.startswith("lm_head") for n in weights) else ()
    return ("model.embed_tokens", "model.layers.0.", "model.layers.3.", *head, "aux.")


def all_weights(lopt_model) -> dict[str, torch.Tensor]:
    """The model's parameters and the aux heads', detached copies."""
    weights = {n: p.detach().clone() for n, p in lopt_model.model.named_parameters()}
    weights.update({f"aux.{n}": p.detach().clone() for n, p in lopt_model.aux_heads.named_parameters()})
    return weights


def library_step(model_to_call, lopt_model, optimizer, batch, sync=None) -> None:
    """One optimizer step the way the trainer mixin takes it: forward (local mode: the early backward runs inside),
    task loss + aux backward, sync, clip over model + aux heads, step."""
    out = model_to_call(**batch)
    aux = lopt_model.take_aux_loss()
    (out.loss + aux).backward()
    if sync is not None:
        sync.sync_gradients()
    params = [*lopt_model.model.parameters(), *lopt_model.aux_heads.parameters()]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def equal_length_rows(n: int = 16) -> list[dict]:
    """Token rows of one length (no padding), so per-rank means average to the global batch's mean exactly."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (n, SEQ), generator=gen).tolist()
    return [{"input_ids": row, "attention_mask": [1] * SEQ, "labels": row} for row in ids]


def make_trainer(
    output_dir: str,
    batch_size: int,
    backward: str = "local",
    fsdp: bool = False,
    aux_objective: str = "recon",
):
    from datasets import Dataset
    from transformers import TrainingArguments, default_data_collator

    from lopt import LoPTConfig
    from lopt.integrations import LoPTTrainer

    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=2,
        max_steps=STEPS,
        learning_rate=LR,
        max_grad_norm=1.0,
        # AdamW's first steps move every weight by ~lr * sign(gradient), also where the gradient is ~0 and its sign
        # is rounding noise (the ranks' partial sums are added in another order than one process's matmul): an eps
        # of 1e-6 keeps those steps ~0, so one process and N ranks agree to 1e-5 (with 1e-8 a few weights differ by
        # ~5e-5).
        adam_epsilon=1e-6,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return LoPTTrainer(
        model=tiny_model("llama", seed=0),
        args=args,
        train_dataset=Dataset.from_list(equal_length_rows()),
        data_collator=default_data_collator,
        lopt_config=LoPTConfig(num_blocks=2, backward=backward, aux_objective=aux_objective),
        fsdp=fsdp,
    )


# --- torchrun workers ----------------------------------------------------------------------------------------------
def _gather_equal(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every rank holds exactly these values."""
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1).float() for _, t in sorted(tensors.items())])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def worker_ddp_library(out_dir: str) -> None:
    """DDP by hand around the library: each rank trains on its half of the global batch."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lopt import param_groups
    from lopt.engine.distributed import LoPTGradientSync

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    for name, (backward, tie) in LIBRARY_VARIANTS.items():
        lopt_model = lopt_model_for(backward, tie)
        sync = LoPTGradientSync(lopt_model)  # before DDP reads the ignore list
        ddp = DDP(lopt_model.model, find_unused_parameters=True)  # the transformers Trainer's default
        optimizer = torch.optim.AdamW(param_groups(lopt_model, lr=LR))
        for step in range(STEPS):
            batch = make_batch(batch_size=2 * world, seq_len=SEQ, seed=step)
            mine = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
            library_step(ddp, lopt_model, optimizer, mine, sync)
        weights = all_weights(lopt_model)
        result[name] = _gather_equal(weights)
        if rank == 0:
            save_file(weights, os.path.join(out_dir, f"library_{name}.safetensors"))
    if rank == 0:
        with open(os.path.join(out_dir, "library.json"), "w") as f:
            json.dump({"ranks_equal": result}, f)


def worker_ddp_trainer(out_dir: str) -> None:
    """transformers.Trainer + the LoPT mixin under torchrun: accelerate wraps the model in DDP."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    report = {}
    for backward in ("local", "joint"):
        trainer = make_trainer(os.path.join(out_dir, backward), batch_size=2, backward=backward)
        trainer.train()
        weights = all_weights(trainer.lopt_model)
        report[backward] = {"ranks_equal": _gather_equal(weights), "log": trainer.state.log_history}
        if dist.get_rank() == 0:
            save_file(weights, os.path.join(out_dir, f"trainer_{backward}.safetensors"))
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "trainer.json"), "w") as f:
            json.dump(report, f)


def block_batches() -> list[dict]:
    """The micro-batches of the block-parallel library test: every rank derives the same ones."""
    batches = []
    for i in range(STEPS * 2):
        batch = make_batch(batch_size=2, seq_len=SEQ, seed=100 + i)
        batches.append({**batch, "attention_mask": torch.ones_like(batch["input_ids"])})
    return batches


BLOCK_KWARGS = dict(learning_rate=LR, early_learning_rate=LR / 2, num_steps=STEPS, warmup_steps=1)


def worker_block_library(out_dir: str) -> None:
    """Two ranks, one block each, two micro-batches per step; rank 0 assembles and saves the model."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from lopt import LoPTConfig
    from lopt.training.block_stage import BlockStage

    dist.init_process_group("gloo")
    stage = BlockStage(
        tiny_model("llama", seed=0),
        LoPTConfig(num_blocks=2),
        gradient_accumulation_steps=2,
        seed=0,
        **BLOCK_KWARGS,
    )
    result = stage.train(block_batches())
    losses = stage.gather_on_rank0(result["losses"])  # [aux losses of rank 0, task losses of rank 1]
    model = stage.assemble_on_rank0()
    if dist.get_rank() == 0:
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        weights.update({f"aux.0.{n}": p.detach().clone() for n, p in stage.aux_head.named_parameters()})
        save_file(weights, os.path.join(out_dir, "block.safetensors"))
        with open(os.path.join(out_dir, "block.json"), "w") as f:
            json.dump({"losses": losses}, f)


def full_weights(lopt_model) -> dict[str, torch.Tensor]:
    """`all_weights`, with FSDP2's sharded parameters (DTensors) gathered into full tensors (a collective)."""
    weights = all_weights(lopt_model)
    return {n: t.full_tensor() if hasattr(t, "full_tensor") else t for n, t in weights.items()}


# FSDP2 variants: (backward, hook order). "lopt_first" is lopt.engine.distributed.fully_shard_lopt_model; "fsdp_first" is
# plain fully_shard calls after get_lopt_model (FSDP2's pre-forward runs before LoPT's boundary hook). "_tied": the
# embedding and LM head are one matrix (in the root unit: its local gradient is reduce-scattered at the boundary).
FSDP2_VARIANTS = {
    "local": ("local", "lopt_first"),
    "joint": ("joint", "lopt_first"),
    "local_fsdp_first": ("local", "fsdp_first"),
    "local_tied": ("local", "lopt_first"),
}
FSDP2_ACCUMULATION = 2
FSDP2_MAX_NORM = 0.5  # below the gradient norms of these steps, so the clipping acts


def fsdp2_micro_batches(step: int, rank: int | None = None) -> list[dict]:
    """The micro-batches of one optimizer step: 2 of 4 rows each (the global batch), or this rank's 2 rows of each."""
    batches = [make_batch(batch_size=4, seq_len=SEQ, seed=10 * step + i) for i in range(FSDP2_ACCUMULATION)]
    if rank is None:
        return batches
    return [{k: v[2 * rank : 2 * rank + 2] for k, v in b.items()} for b in batches]


def fsdp2_step(lopt_model, optimizer, micro_batches, sync=None) -> float:
    """One optimizer step as the trainer takes it: gradient accumulation (the local backward scaled like the loss),
    the aux heads synced, one global clipping norm over the model and the aux heads, AdamW."""
    from lopt.engine.distributed import clip_grad_norm_

    lopt_model.loss_scale = 1 / len(micro_batches)
    for batch in micro_batches:
        out = lopt_model.model(**batch)
        ((out.loss + lopt_model.take_aux_loss()) / len(micro_batches)).backward()
    if sync is not None:
        sync.sync_gradients()
    norm = clip_grad_norm_(lopt_model.model.parameters(), lopt_model.aux_heads.parameters(), FSDP2_MAX_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def worker_fsdp2(out_dir: str) -> None:
    """LoPT under FSDP2 (`fully_shard` on every decoder layer and on the HF model; the aux heads stay replicated,
    their gradients averaged by LoPTGradientSync). Each rank trains on its half of every micro-batch."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.fsdp import fully_shard

    from lopt import param_groups
    from lopt.engine.distributed import LoPTGradientSync, fully_shard_lopt_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {}
    for name, (backward, order) in FSDP2_VARIANTS.items():
        lopt_model = lopt_model_for(backward, tie=name.endswith("_tied"))
        sync = LoPTGradientSync(
            lopt_model, sync_early=False
        )  # FSDP reduces the whole model; we sync the aux heads
        if order == "lopt_first":
            fully_shard_lopt_model(lopt_model)
        else:
            for layer in lopt_model.model.model.layers:
                fully_shard(layer)
            fully_shard(lopt_model.model)
        optimizer = torch.optim.AdamW(param_groups(lopt_model, lr=LR))  # after sharding: DTensor parameters
        norms = [fsdp2_step(lopt_model, optimizer, fsdp2_micro_batches(s, rank), sync) for s in range(STEPS)]
        weights = full_weights(lopt_model)
        report[name] = {"ranks_equal": _gather_equal(weights), "norms": norms}
        if rank == 0:
            save_file(weights, os.path.join(out_dir, f"fsdp2_{name}.safetensors"))
    # The trainer path: LoPTTrainer(fsdp=True) shards the model itself (as `lopt sft --fsdp` does).
    trainer = make_trainer(os.path.join(out_dir, "trainer"), batch_size=2, fsdp=True)
    trainer.train()
    aux = {f"aux.{n}": p.detach().clone() for n, p in trainer.lopt_model.aux_heads.named_parameters()}
    report["trainer"] = {"ranks_equal": _gather_equal(aux), "log": trainer.state.log_history}
    try:  # the anchor objectives are refused under fsdp=True, in one line, before the model is touched
        make_trainer(os.path.join(out_dir, "anchor"), batch_size=2, fsdp=True, aux_objective="recon+anchor")
        report["anchor_refusal"] = None
    except ValueError as err:
        report["anchor_refusal"] = str(err)
    if rank == 0:  # after train(), rank 0's trainer.model is an unsharded copy
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        save_file({**weights, **aux}, os.path.join(out_dir, "fsdp2_trainer.safetensors"))
        with open(os.path.join(out_dir, "fsdp2.json"), "w") as f:
            json.dump(report, f)


# --- TRL's DPO and GRPO under torchrun (DDP, through accelerate) -----------------------------------------------------
# One length for every prompt and every answer (no padding): the aux loss is a mean over all positions of a rank's
# batch, so only unpadded batches make the mean over ranks equal one process's mean.
DPO_ROWS = [
    {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
    for a, b in [(1, 2), (3, 4), (5, 3), (2, 2), (4, 1), (6, 2), (1, 1), (0, 5)]
]


# What the DPO and GRPO equality runs share: 2 SGD steps (a step is lr x gradient), clipped, logged, nothing saved.
RL_TEST_ARGS = dict(
    max_steps=2,
    learning_rate=0.5,
    optim="sgd",
    max_grad_norm=1.0,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    disable_tqdm=True,
    use_cpu=True,
    seed=0,
)


def make_dpo_trainer(checkpoint: str, output_dir: str, batch_size: int):
    """LoPTDPOTrainer (local mode) on the tiny char-level checkpoint, float64 and SGD: DDP's gradient average and one
    process's batch gradient then agree to rounding (in float32 a batch of 4 and 2 x 2 differ by up to ~1% of a
    gradient entry on this model, see test_rl_gradients), and SGD's step is lr * gradient."""
    from datasets import Dataset
    from test_rl_gradients import _load
    from transformers import set_seed
    from trl import DPOConfig

    from lopt import LoPTConfig
    from lopt.integrations import LoPTDPOTrainer

    set_seed(0)
    model, tokenizer = _load(checkpoint, torch.float64)
    args = DPOConfig(
        output_dir=output_dir, per_device_train_batch_size=batch_size, beta=0.1, max_length=32, **RL_TEST_ARGS
    )
    return LoPTDPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(DPO_ROWS),
        processing_class=tokenizer,
        lopt_config=LoPTConfig(num_blocks=2),
    )


def make_grpo_trainer(checkpoint: str, output_dir: str, batch_size: int):
    """LoPTGRPOTrainer (local mode) with fixed generations: completion j of a prompt is a function of the prompt and
    j, so one process and N ranks train on the same completions and rewards. float64 and SGD, as for DPO."""
    from datasets import Dataset
    from test_rl_gradients import _load, char_sum_reward
    from transformers import set_seed
    from trl import GRPOConfig

    from lopt import LoPTConfig
    from lopt.integrations import LoPTGRPOTrainer

    class FixedGenerations(LoPTGRPOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, **kwargs):
            completions = []
            for i, ids in enumerate(prompt_ids):
                j = i % num_generations  # prompts come in groups of num_generations copies
                tokens = [5 + (int(sum(ids)) + 3 * j + t) % 20 for t in range(2 + j)]
                completions.append([*tokens, self.eos_token_ids[0]])
            return completions, None

    set_seed(0)
    model, tokenizer = _load(checkpoint, torch.float64)
    args = GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        num_generations=2,
        max_completion_length=4,
        beta=0.1,
        **RL_TEST_ARGS,
    )
    return FixedGenerations(
        model=model,
        reward_funcs=char_sum_reward,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": r["prompt"], "answer": r["chosen"]} for r in DPO_ROWS]),
        processing_class=tokenizer,
        lopt_config=LoPTConfig(num_blocks=2),
    )


def worker_rl(out_dir: str) -> None:
    """DPO (2 ranks x 2 pairs per step) and GRPO (2 ranks x 4 fixed completions per step) with LoPT, under torchrun."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    checkpoint = os.path.join(out_dir, "tiny")
    report = {}
    for name in (
        "dpo",
        "grpo",
    ):  # each built right before it trains: the data order draws from the global RNG
        if name == "dpo":
            trainer = make_dpo_trainer(checkpoint, os.path.join(out_dir, name), batch_size=2)
        else:
            trainer = make_grpo_trainer(checkpoint, os.path.join(out_dir, name), batch_size=4)
        before = all_weights(trainer.lopt_model)
        trainer.train()
        weights = all_weights(trainer.lopt_model)
        changed = sorted(k for k in weights if not torch.equal(weights[k], before[k]))
        report[name] = {
            "ranks_equal": _gather_equal(weights),
            "changed": changed,
            "log": trainer.state.log_history,
        }
        if dist.get_rank() == 0:
            save_file(weights, os.path.join(out_dir, f"{name}.safetensors"))
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "rl.json"), "w") as f:
            json.dump(report, f)


def worker_cache_built_on_rank_1(out_dir: str) -> None:
    """Rank 1 alone builds the built-in base into an empty cache ($LOPT_CACHE_DIR) while rank 0 waits at a barrier,
    then rank 0 reads it: the build must not depend on the rank that takes the lock. Also, on rank 1,
    `save_checkpoint_files` (what every lopt cache writes with) and `LoPTModel.save_pretrained` (rank 0 writes)."""
    import torch.distributed as dist

    from lopt import LoPTConfig, get_lopt_model
    from lopt.builtin.base import METADATA_FILE, builtin_model_path
    from lopt.io import is_complete_checkpoint, save_checkpoint_files

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 1:
        builtin_model_path(progress=False)
        save_checkpoint_files(tiny_model("llama", tie=True), os.path.join(out_dir, "rank1_save"))
    lopt_model = get_lopt_model(tiny_model("llama"), LoPTConfig(num_blocks=2))
    lopt_model.save_pretrained(os.path.join(out_dir, "lopt_save"))  # every rank calls it, as users do
    dist.barrier()
    if rank == 0:
        from transformers import AutoModelForCausalLM

        path = builtin_model_path(progress=False)  # built by rank 1: found, not built again
        AutoModelForCausalLM.from_pretrained(path)
        report = {
            "base_complete": is_complete_checkpoint(path, METADATA_FILE),
            "leftovers": sorted(p.name for p in path.parent.glob(".*.tmp-*")),
            "rank1_save_complete": is_complete_checkpoint(os.path.join(out_dir, "rank1_save")),
            "lopt_save_complete": is_complete_checkpoint(os.path.join(out_dir, "lopt_save")),
            "out_dir": sorted(os.listdir(out_dir)),
        }
        with open(os.path.join(out_dir, "cache.json"), "w") as f:
            json.dump(report, f)


def worker_cli_user_error_on_rank_1(out_dir: str) -> None:
    """`lopt sft --block_parallel` where rank 1 alone stops with a UserError while building its block: rank 0 goes on
    to its first collective and loses its peer there."""
    from lopt.cli.main import main
    from lopt.errors import UserError
    from lopt.training import block_stage

    build_stage = block_stage.BlockStage.__init__

    def failing_on_rank_1(self, *args, **kwargs):
        if os.environ["RANK"] == "1":
            raise UserError("rank 1 cannot build its block: the fix is X")
        build_stage(self, *args, **kwargs)

    block_stage.BlockStage.__init__ = failing_on_rank_1
    args = [
        "sft",
        "--block_parallel",
        "--max_samples",
        "16",
        "--no_progress",
        "--output_dir",
        os.path.join(out_dir, "bp"),
    ]
    sys.stdout.flush()
    os._exit(main(args))


WORKERS = {
    "cache_built_on_rank_1": worker_cache_built_on_rank_1,
    "cli_user_error_on_rank_1": worker_cli_user_error_on_rank_1,
    "ddp_library": worker_ddp_library,
    "ddp_trainer": worker_ddp_trainer,
    "block_library": worker_block_library,
    "fsdp2": worker_fsdp2,
    "rl": worker_rl,
}

if __name__ == "__main__":
    torch.set_num_threads(1)
    WORKERS[sys.argv[1]](sys.argv[2])
    # A barrier as the last collective, then no interpreter teardown: torch 2.13's gloo process-group destructor
    # can deadlock on the GIL when it runs (e.g. from a garbage-collected DDP reducer) while a gloo thread still
    # releases a collective that has just finished (see lopt.engine.distributed.finish).
    from lopt.engine.distributed import finish

    finish()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --- pytest side -----------------------------------------------------------------------------------------------------
import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def torchrun(args: list[str], env: dict | None = None, nproc: int = 2, timeout: int = 600):
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # --standalone: the rendezvous store binds a free port itself (no port picked here and raced for meanwhile).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def run_worker(scenario: str, out_dir) -> None:
    proc = torchrun([__file__, scenario, str(out_dir)])
    assert proc.returncode == 0, f"worker {scenario} failed:\n{proc.stderr[-4000:]}"


def assert_close(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=1e-4, msg=name)


def test_ddp_library_matches_one_process_on_the_global_batch(tmp_path):
    """Local and joint mode under DDP, and a tied embedding and LM head (whose local-backward gradient arrives during
    the forward, before DDP expects it): every rank ends equal, and equal to one process on the whole batch."""
    from lopt import param_groups

    run_worker("ddp_library", tmp_path)
    assert json.loads((tmp_path / "library.json").read_text())["ranks_equal"] == dict.fromkeys(
        LIBRARY_VARIANTS, True
    )
    for name, (backward, tie) in LIBRARY_VARIANTS.items():
        lopt_model = lopt_model_for(backward, tie)
        initial = all_weights(lopt_model)
        optimizer = torch.optim.AdamW(param_groups(lopt_model, lr=LR))
        for step in range(STEPS):
            library_step(lopt_model.model, lopt_model, optimizer, make_batch(4, SEQ, seed=step))
        reference = all_weights(lopt_model)
        ddp = load_file(tmp_path / f"library_{name}.safetensors")
        assert_close(ddp, reference)
        # Every block (and the aux heads) moved: the comparison is not vacuous.
        for prefix in moved_prefixes(reference):
            name = next(n for n in reference if n.startswith(prefix))
            assert not torch.allclose(reference[name], initial[name]), name


@pytest.fixture(scope="module")
def trainer_worker_output(tmp_path_factory):
    """One torchrun launch trains both modes (the launch, not the training, is what costs time)."""
    out = tmp_path_factory.mktemp("ddp-trainer")
    run_worker("ddp_trainer", out)
    return out


@pytest.mark.parametrize("backward", ["local", "joint"])
def test_ddp_trainer_matches_one_process_and_ranks_agree(backward, trainer_worker_output):
    """LoPTTrainer (transformers.Trainer + mixin) under torchrun: accelerate's DDP (find_unused_parameters=True),
    gradient accumulation 2, grad clipping. 2 ranks x batch 2 equals one process x batch 4 (same samples)."""
    out = trainer_worker_output
    report = json.loads((out / "trainer.json").read_text())[backward]
    assert report["ranks_equal"]
    trainer = make_trainer(str(out / f"single-{backward}"), batch_size=4, backward=backward)
    trainer.train()
    assert_close(load_file(out / f"trainer_{backward}.safetensors"), all_weights(trainer.lopt_model))
    # The logged LoPT losses are the mean over ranks, so they match the single process too.
    logged = [e for e in report["log"] if "aux_loss_0" in e]
    single = [e for e in trainer.state.log_history if "aux_loss_0" in e]
    assert len(logged) == STEPS
    for key in ("task_loss", "aux_loss_0"):
        assert [e[key] for e in logged] == pytest.approx([e[key] for e in single], rel=1e-4)


def test_block_parallel_library_matches_single_process_lopt(tmp_path):
    """Block-parallel (no clipping) computes exactly single-process LoPT with the local backward."""
    from transformers import get_linear_schedule_with_warmup

    from lopt import param_groups
    from lopt.training.block_stage import make_aux_heads

    run_worker("block_library", tmp_path)
    lopt_model = lopt_model_for("local")
    initial = all_weights(lopt_model)
    head = make_aux_heads(32, 1, lopt_model.lopt_config.aux_head_ratio, seed=0)[0]
    lopt_model.aux_heads[0].load_state_dict(head.state_dict())
    optimizer = torch.optim.AdamW(param_groups(lopt_model, lr=LR, early_lr=LR / 2))
    scheduler = get_linear_schedule_with_warmup(optimizer, BLOCK_KWARGS["warmup_steps"], STEPS)
    lopt_model.loss_scale = 1 / 2
    batches = iter(block_batches())
    task_losses = []
    for _ in range(STEPS):
        total = 0.0
        for _ in range(2):
            out = lopt_model(**next(batches))
            (out.loss / 2).backward()
            total += float(out.task_loss) / 2
        task_losses.append(total)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    reference = {n: p.detach() for n, p in lopt_model.model.named_parameters()}
    reference.update({f"aux.{n}": p.detach() for n, p in lopt_model.aux_heads.named_parameters()})
    assert_close(load_file(tmp_path / "block.safetensors"), reference)
    for prefix in ("model.embed_tokens", "model.layers.0.", "model.layers.3.", "lm_head", "aux."):
        name = next(n for n in reference if n.startswith(prefix))
        assert not torch.allclose(reference[name], initial[name]), name
    aux_losses, last_rank_task_losses = json.loads((tmp_path / "block.json").read_text())["losses"]
    assert last_rank_task_losses == pytest.approx(task_losses, rel=1e-5)
    assert len(aux_losses) == STEPS


@pytest.fixture(scope="module")
def fsdp2_worker_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    run_worker("fsdp2", out)
    return out


@pytest.mark.parametrize("variant", list(FSDP2_VARIANTS))
def test_fsdp2_matches_one_process_on_the_global_batch(variant, fsdp2_worker_output):
    """LoPT under FSDP2 (fully_shard per decoder layer and on the HF model, gloo, 2 ranks), gradient accumulation 2,
    clipping with one global norm: every rank ends equal, and equal to one process on the whole batches.
    Local mode runs each early block's backward inside the forward (lopt.engine.distributed.fsdp2_local_backward)."""
    from lopt import param_groups

    report = json.loads((fsdp2_worker_output / "fsdp2.json").read_text())[variant]
    assert report["ranks_equal"]
    lopt_model = lopt_model_for(FSDP2_VARIANTS[variant][0], tie=variant.endswith("_tied"))
    initial = all_weights(lopt_model)
    optimizer = torch.optim.AdamW(param_groups(lopt_model, lr=LR))
    norms = [fsdp2_step(lopt_model, optimizer, fsdp2_micro_batches(step)) for step in range(STEPS)]
    reference = all_weights(lopt_model)
    assert_close(load_file(fsdp2_worker_output / f"fsdp2_{variant}.safetensors"), reference)
    assert report["norms"] == pytest.approx(norms, rel=1e-5)
    assert min(norms) > FSDP2_MAX_NORM  # the clipping acted at every step
    for prefix in moved_prefixes(reference):
        name = next(n for n in reference if n.startswith(prefix))
        assert not torch.allclose(reference[name], initial[name]), name


def test_fsdp2_trainer_matches_one_process(fsdp2_worker_output):
    """LoPTTrainer(fsdp=True) under torchrun (local mode, gradient accumulation 2, clipping): equal to one process on
    the batch of 4, the logged losses and gradient norms too."""
    report = json.loads((fsdp2_worker_output / "fsdp2.json").read_text())
    assert report["anchor_refusal"] == (
        "--aux_objective recon+anchor is not supported with --fsdp (its frozen pretrained reference is not "
        "sharded): use --aux_objective recon, or train without --fsdp (DDP)."
    )
    report = report["trainer"]
    assert report["ranks_equal"]  # the replicated aux heads
    single = make_trainer(str(fsdp2_worker_output / "single"), batch_size=4)
    single.train()
    assert_close(load_file(fsdp2_worker_output / "fsdp2_trainer.safetensors"), all_weights(single.lopt_model))
    logged = [e for e in report["log"] if "aux_loss_0" in e]
    reference = [e for e in single.state.log_history if "aux_loss_0" in e]
    assert len(logged) == STEPS
    for key in ("task_loss", "aux_loss_0", "grad_norm"):
        assert [e[key] for e in logged] == pytest.approx([e[key] for e in reference], rel=1e-4), key


@pytest.fixture(scope="module")
def rl_worker_output(tmp_path_factory):
    from test_rl_gradients import char_tokenizer

    out = tmp_path_factory.mktemp("rl")
    tokenizer = char_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(out / "tiny")
    tokenizer.save_pretrained(out / "tiny")
    run_worker("rl", out)
    return out


def _assert_every_block_changed(changed: list[str]) -> None:
    for prefix in ("model.embed_tokens", "model.layers.0.", "model.layers.3.", "lm_head", "aux."):
        assert any(name.startswith(prefix) for name in changed), prefix


@pytest.mark.parametrize(
    ("algorithm", "make_trainer", "batch_size", "logged_keys"),
    [
        # DPO: the batch of 4 pairs (same pairs per step).
        ("dpo", make_dpo_trainer, 4, ("loss", "task_loss", "aux_loss_0", "grad_norm")),
        # GRPO with fixed generations (sampling replaced by a function of the prompt): one process generates all 8
        # completions of a step.
        ("grpo", make_grpo_trainer, 8, ("loss", "task_loss", "aux_loss_0", "grad_norm", "reward")),
    ],
)
def test_rl_under_torchrun_matches_one_process(
    rl_worker_output, algorithm, make_trainer, batch_size, logged_keys
):
    """LoPT's DPO/GRPO trainers under torchrun (accelerate's DDP): every rank ends equal, and equal to one process
    on the global batch, with clipping."""
    report = json.loads((rl_worker_output / "rl.json").read_text())[algorithm]
    assert report["ranks_equal"]
    _assert_every_block_changed(report["changed"])
    single = make_trainer(
        str(rl_worker_output / "tiny"), str(rl_worker_output / f"{algorithm}-single"), batch_size=batch_size
    )
    single.train()
    # The late block, final norm and LM head agree to float64 rounding (~1e-9); the early blocks and aux heads to
    # float32 rounding (~1e-5), since the aux heads and their MSE stay in float32 by design.
    assert_close(
        load_file(rl_worker_output / f"{algorithm}.safetensors"), all_weights(single.lopt_model), atol=5e-5
    )
    logged = [e for e in report["log"] if "aux_loss_0" in e]
    reference = [e for e in single.state.log_history if "aux_loss_0" in e]
    assert len(logged) == 2
    for key in logged_keys:
        assert [e[key] for e in logged] == pytest.approx([e[key] for e in reference], rel=1e-4), key


# --- the command line under torchrun ------------------------------------------------------------------------------
FAST = [
    "--per_device_train_batch_size",
    "4",
    "--max_samples",
    "64",
    "--eval_samples",
    "4",
    "--logging_steps",
    "1",
]
FAST += ["--no_progress"]


def read_metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_checkpoint(output_dir, base_path) -> None:
    """A standard HF checkpoint in `lopt sft`'s layout, trained in every block."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "lopt_config.json", "training_args.json", "lopt_args.json", "summary.json"):
        assert os.path.isfile(os.path.join(output_dir, name)), name
    AutoModelForCausalLM.from_pretrained(output_dir)
    assert AutoTokenizer.from_pretrained(output_dir).chat_template
    base = load_file(os.path.join(base_path, "model.safetensors"))
    trained = load_file(os.path.join(output_dir, "model.safetensors"))
    # The base's shape: the built-in model is untied (its checkpoint has lm_head.weight), and LoPT adds no key.
    assert set(trained) == set(base) and "lm_head.weight" in base and not any("aux" in k for k in trained)
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    layers = {int(k.split(".")[2]) for k in changed if k.startswith("model.layers.")}
    assert layers == set(range(AutoModelForCausalLM.from_pretrained(output_dir).config.num_hidden_layers))


@pytest.fixture
def empty_cache(builtin_tiny, tmp_path):
    """The subprocess environment of `builtin_tiny` with a new, empty cache: the run's ranks build the base themselves
    (a user's first run). `base()` is the base they built, once the run is over."""
    from lopt.builtin.base import builtin_model_path

    cache = tmp_path / "empty-cache"
    env = {**builtin_tiny["env"], "LOPT_CACHE_DIR": str(cache)}
    return {
        "env": env,
        "base": lambda: str(builtin_model_path(preset="tiny", cache_dir=cache, progress=False)),
    }


def test_a_cache_built_by_rank_1_is_complete(builtin_tiny, tmp_path):
    """transformers' save_pretrained writes nothing on a rank other than 0 once a process group is up: rank 1 building
    lopt's cache must still write it whole (and rank 0, waiting, must find it)."""
    env = {**builtin_tiny["env"], "LOPT_CACHE_DIR": str(tmp_path / "empty-cache")}
    proc = torchrun([__file__, "cache_built_on_rank_1", str(tmp_path)], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "cache.json").read_text())
    assert report["base_complete"] and report["leftovers"] == []
    assert report["rank1_save_complete"] and report["lopt_save_complete"]
    assert not [
        name for name in report["out_dir"] if name.startswith(".tmp-")
    ]  # rank 1 put no empty copy in place


def test_torchrun_lopt_sft_trains_data_parallel(empty_cache, tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun(
        ["-m", "lopt", "sft", *FAST, "--max_steps", "3", "--output_dir", str(out)], empty_cache["env"]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_checkpoint(out, empty_cache["base"]())
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]  # rank 0 alone writes
    assert metrics[0]["epoch"] == pytest.approx(8 / 64)  # 2 ranks x 4 rows per step
    assert all(m["aux_loss_0"] > 0 and m["task_loss"] > 0 for m in metrics)
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_torchrun_lopt_sft_fsdp_saves_one_checkpoint_and_resumes(empty_cache, tmp_path):
    """`lopt sft --fsdp` shards the model with FSDP2 (gloo), from an empty cache: one standard HF checkpoint on rank 0,
    checkpoints with each rank's optimizer shard, and a run resumed after step 2 ends with exactly the weights of the
    run that did not stop."""
    env = empty_cache["env"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ["-m", "lopt", "sft", "--fsdp", "--method", "lopt", *FAST, "--max_steps", "3", "--save_steps", "2"]
    proc = torchrun([*args, "--output_dir", str(full)], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_checkpoint(full, empty_cache["base"]())
    assert [m["step"] for m in read_metrics(full)] == [1, 2, 3]
    names = set(os.listdir(full / "checkpoint-2"))
    assert {
        "model.safetensors",
        "optimizer.rank0-of-2.pt",
        "optimizer.rank1-of-2.pt",
        "scheduler.pt",
    } <= names
    checkpoint = str(full / "checkpoint-2")
    proc = torchrun([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", checkpoint], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [m["step"] for m in read_metrics(resumed)] == [3]
    expected, actual = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_fsdp_flag_refusals(capsys, monkeypatch):
    """Without torchrun, and for the commands it is not built for: one line, exit 2 (before any model is loaded)."""
    from lopt.cli.main import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for command, line in (
        (
            "sft",
            "--fsdp shards the model over the processes of a torchrun launch: start it with `torchrun "
            "--nproc_per_node N -m lopt sft --fsdp ...`.",
        ),
        ("dpo", "--fsdp is built for lopt sft only: train lopt dpo data-parallel (plain torchrun)."),
        (
            "sft --block_parallel",
            "--fsdp and --block_parallel are exclusive: choose one way to split the work.",
        ),
    ):
        assert main([*command.split(), "--fsdp"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"lopt {command.split()[0]}: error: {line}"]


def test_block_parallel_cli_trains_and_saves_one_checkpoint(empty_cache, tmp_path):
    out = tmp_path / "bp"
    args = ["-m", "lopt", "sft", "--block_parallel", *FAST, "--max_steps", "10", "--output_dir", str(out)]
    proc = torchrun(args, empty_cache["env"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_checkpoint(out, empty_cache["base"]())
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 11))
    task = [m["task_loss"] for m in metrics]
    assert sum(task[-3:]) / 3 < sum(task[:3]) / 3 - 0.5, task  # the task loss goes down
    assert all(m["aux_loss_0"] > 0 for m in metrics)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["block_parallel"] == 2 and summary["steps"] == 10 and summary["tokens_per_s"] > 0


def test_block_parallel_refuses_bad_process_counts(builtin_tiny, tmp_path):
    env = builtin_tiny["env"]
    proc = torchrun(["-m", "lopt", "sft", "--block_parallel", "--num_blocks", "3", "--no_progress"], env)
    assert proc.returncode != 0
    assert "--num_blocks 3 but 2 processes (use torchrun --nproc_per_node 3" in proc.stderr
    # Each rank prints that one line and exits 2, unless torchrun stopped it first (it stops the other ranks as soon
    # as one fails, so whether the second gets to print depends on timing); torchrun's report names the line.
    lines = proc.stderr.splitlines()
    assert any(ln.startswith("lopt sft: error: --block_parallel needs one process per block") for ln in lines)
    assert "traceback : lopt sft: error: --block_parallel needs one process per block" in proc.stderr
    assert "exitcode  : 2" in proc.stderr and "lopt/training/block_parallel.py" not in proc.stderr
    # Flags that block-parallel training cannot take: one line, exit 2, before any process is started.
    proc = subprocess.run(
        [sys.executable, "-m", "lopt", "sft", "--block_parallel", "--method", "e2e"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "lopt sft: error: --block_parallel trains LoPT blocks (--method lopt), not --method e2e."
    ]


def test_user_error_on_one_rank_reaches_the_launcher(builtin_tiny, tmp_path):
    """One rank stops with a UserError: every rank stops, torchrun's report names that line as the root cause, and
    no rank ends in a gloo traceback; lopt's own launcher ends with the line and the rank's exit code."""
    env = builtin_tiny["env"]
    line = "lopt sft: error: rank 1 cannot build its block: the fix is X"

    proc = torchrun([__file__, "cli_user_error_on_rank_1", str(tmp_path / "torchrun")], env)
    assert proc.returncode != 0
    root_cause = proc.stderr.split("Root Cause")[-1]
    assert line in root_cause and "rank      : 1" in root_cause, proc.stderr[-3000:]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr, proc.stderr[
        -3000:
    ]

    code = (
        "import sys; from lopt.training.launch import launch_local; "
        f"sys.exit(launch_local(2, [{__file__!r}, 'cli_user_error_on_rank_1', {str(tmp_path / 'own')!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == line, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_block_parallel_without_torchrun_starts_its_own_ranks(empty_cache, tmp_path):
    out = tmp_path / "bp"
    args = ["-m", "lopt", "sft", "--block_parallel", *FAST, "--max_steps", "2", "--output_dir", str(out)]
    proc = subprocess.run(
        [sys.executable, *args], env=empty_cache["env"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_checkpoint(out, empty_cache["base"]())
    assert json.loads((out / "summary.json").read_text())["block_parallel"] == 2
