"""Plant known bugs, one at a time, and show that the tests written for each one catch it.

    python tests/mutants.py                  # every mutant (about 15 minutes on 2 cores)
    python tests/mutants.py ln_eps gelu_tanh # some of them
    python tests/mutants.py --list
    python tests/mutants.py --baseline       # the same tests on the unchanged code: all pass

Each mutant replaces text in one source file of a copy of the work tree (git's tracked and
untracked, not ignored, files) and runs its tests there with pytest. It counts as caught when
every selected test fails (a test that still passes would leave part of the bug unguarded).
`tests/test_mutants.py`, part of the normal suite, checks that every mutant's text is still in
the code and every named test still exists, so that this list cannot rot silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    bug: str
    file: str
    replacements: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]  # pytest node ids
    select: str | None = None  # pytest -k expression over those tests

    def apply(self, root: Path) -> None:
        path = root / self.file
        text = path.read_text()
        for old, new in self.replacements:
            if text.count(old) != 1:
                raise ValueError(
                    f"mutant {self.name}: {old!r} occurs {text.count(old)} times in {self.file}, "
                    "expected once; update tests/mutants.py to the code"
                )
            text = text.replace(old, new)
        path.write_text(text)


def _one(file: str, old: str, new: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return file, ((old, new),)


VIT = "tests/test_vit_parity.py"
PEFT = "tests/test_peft_parity.py"
TRAJECTORY = "tests/test_train_parity.py::test_six_epochs_match_the_reference"
LIGHTNING = "tests/test_train.py::test_schedule_matches_lightning_bolts"
RUN_STEPS = "tests/test_runner.py::test_runs_steps_take_images_in_0_255_and_normalise_them"
CHUNKED_STEP = "tests/test_train.py::test_chunked_train_step_matches_the_batched_step"
SERVING = (
    "tests/test_serving.py::test_a_shuffled_mixed_batch_gives_each_example_its_own_tasks_logits"
)
HOULSBY_INIT = (
    f"{PEFT}::test_initialisation_matches_the_reference[adapter_houlsby]",
    f"{PEFT}::test_initialisation_matches_the_reference[lora]",  # LoRA branches: houlsby
)
VIT_ALL = (f"{VIT}::test_matches_timm", f"{VIT}::test_res_post_block_model")

METHODS_T = "tests/test_methods.py"
PEFT_METHODS = f"{METHODS_T}::test_a_peft_model_converts_and_computes_what_peft_computes"
TUNING = "adapter_plus_jax/tuning.py"

MUTANTS = [
    Mutant(
        "drop_path_constant",
        "every block drops its branches at drop_path_rate, not at linspace(0, rate, depth)[i]",
        *_one(
            "adapter_plus_jax/model.py",
            "rate = float(np.linspace(0.0, cfg.drop_path_rate, cfg.depth)[i])",
            "rate = cfg.drop_path_rate",
        ),
        tests=(f"{VIT}::test_stochastic_depth_is_linear_over_depth",),
    ),
    Mutant(
        "pretrained_dropped",
        "params.init_params keeps only the head of the ported tree (a random backbone trains)",
        *_one(
            "adapter_plus_jax/params.py",
            "    fresh.update(given)\n",
            '    fresh.update({k: v for k, v in given.items() if k[0] == "head"})\n',
        ),
        tests=("tests/test_runner.py::test_pretrained_weights_reach_the_trained_model",),
    ),
    Mutant(
        "backbone_trained",
        "runner trains every parameter whatever train_mode says",
        *_one(
            "adapter_plus_jax/experiment.py",
            "state, frozen = train.init_state(params, tx, config.train_mode)",
            'state, frozen = train.init_state(params, tx, "finetune")',
        ),
        tests=("tests/test_runner.py::test_pretrained_weights_reach_the_trained_model",),
    ),
    Mutant(
        "ln_eps",
        "the blocks' LayerNorm eps 10x too large (1e-5 for timm's 1e-6)",
        *_one(
            "adapter_plus_jax/model.py",
            "norm = functools.partial(nn.LayerNorm, epsilon=cfg.norm_eps)\n        if cfg.block",
            "norm = functools.partial(nn.LayerNorm, epsilon=10 * cfg.norm_eps)\n"
            "        if cfg.block",
        ),
        tests=VIT_ALL,
    ),
    Mutant(
        "gelu_tanh",
        "tanh-approximated GELU where timm uses the exact (erf) GELU",
        *_one(
            "adapter_plus_jax/layers.py",
            '"gelu": _gelu,',
            '"gelu": lambda x: jax.nn.gelu(x, approximate=True),',
        ),
        tests=VIT_ALL,
        select="not quickgelu and not tanh_gelu",  # the cases that do not use erf-GELU
    ),
    Mutant(
        "decay_all",
        "weight decay on every trainable parameter (biases and scalings too)",
        *_one(
            "adapter_plus_jax/train.py",
            'return ndim > 1 and name not in ("bias", "scaling") and name not in NO_DECAY_NAMES',
            "return True",
        ),
        tests=(TRAJECTORY, "tests/test_train.py::test_decay_mask_follows_the_reference_rule"),
    ),
    Mutant(
        "decay_none",
        "no weight decay at all",
        *_one(
            "adapter_plus_jax/train.py",
            "weight_decay=weight_decay, mask=decay_mask",
            "weight_decay=0.0, mask=decay_mask",
        ),
        tests=(TRAJECTORY,),
    ),
    Mutant(
        "schedule_no_lag",
        "epoch k runs at f(k) instead of f(k - 1) (the per-epoch scheduler's lag lost)",
        *_one(
            "adapter_plus_jax/train.py",
            "return jnp.where(epoch == 0, s, f(jnp.maximum(epoch - 1, 0).astype(jnp.float32)))",
            "return f(epoch.astype(jnp.float32))",
        ),
        tests=(
            TRAJECTORY,
            LIGHTNING,
            "tests/test_train.py::test_schedule_matches_the_recipe_table",
        ),
    ),
    Mutant(
        "schedule_step_early",
        "the lr changes one step before the epoch ends",
        *_one(
            "adapter_plus_jax/train.py",
            "epoch = step // steps_per_epoch",
            "epoch = (step + 1) // steps_per_epoch",
        ),
        tests=(TRAJECTORY, LIGHTNING),
    ),
    Mutant(
        "vtab_rank",
        "svhn's per-task Adapter+ rank (dim1-32) 8 instead of 16",
        *_one(
            "adapter_plus_jax/configs/vtab.py", '"svhn": (4, 8, 16, 50),', '"svhn": (4, 8, 8, 50),'
        ),
        tests=(
            "tests/test_configs.py::test_every_vtab_task_and_method[adapter_plus]",
            "tests/test_configs.py::test_vtab_per_task_ranks[dim1-32-3]",
        ),
    ),
    Mutant(
        "base_weight_decay",
        "the base recipe's weight decay 1e-3 instead of 1e-4",
        *_one("adapter_plus_jax/config.py", "c.weight_decay = 1e-4", "c.weight_decay = 1e-3"),
        tests=(
            "tests/test_configs.py::test_base_recipe",
            "tests/test_configs.py::test_every_vtab_task_and_method",
            "tests/test_configs.py::test_every_fgvc_dataset_and_method",
        ),
    ),
    Mutant(
        "houlsby_std",
        "houlsby init with std 0.02 instead of 0.01",
        *_one(
            "adapter_plus_jax/peft.py",
            "return trunc_normal(0.01), zeros, trunc_normal(0.01)",
            "return trunc_normal(0.02), zeros, trunc_normal(0.02)",
        ),
        tests=HOULSBY_INIT,
    ),
    Mutant(
        "houlsby_cutoff",
        "houlsby init cut at 3 std instead of 2",
        *_one(
            "adapter_plus_jax/peft.py",
            "return trunc_normal(0.01), zeros, trunc_normal(0.01)",
            "return trunc_normal(0.01, 3.0), zeros, trunc_normal(0.01, 3.0)",
        ),
        tests=HOULSBY_INIT,
    ),
    Mutant(
        "lora_init_bound",
        "init='lora' draws U(+-sqrt(3/fan_in)) (Kaiming, a=0), not torch's U(+-1/sqrt(fan_in))",
        *_one(
            "adapter_plus_jax/layers.py",
            "bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0",
            "bound = math.sqrt(3.0 / fan_in) if fan_in > 0 else 0.0",
        ),
        tests=(f"{PEFT}::test_initialisation_matches_the_reference[adapter_lora]",),
    ),
    Mutant(
        "vpt_init",
        "prompts drawn with VPT's U(+-sqrt(6 / (3 p^2 + 768))) instead of the reference's + T",
        *_one(
            "adapter_plus_jax/peft.py",
            "3 * patch_size[0] * patch_size[1] + num_tokens",
            "3 * patch_size[0] * patch_size[1] + 768",
        ),
        tests=(f"{PEFT}::test_initialisation_matches_the_reference[vpt]",),
    ),
    Mutant(
        "lora_dropout_after_down",
        "LoRA's dropout after the down-projection instead of before it",
        "adapter_plus_jax/peft.py",
        (
            ("    if s.pre_dropout:\n", "    if False:\n"),
            ("    if not s.pre_dropout:\n", "    if True:\n"),
        ),
        tests=(f"{PEFT}::test_training_mode_parity[lora_pre_dropout]",),
    ),
    Mutant(
        "adapter_dropout_before_act",
        "the adapter's dropout before its activation instead of after it",
        *_one(
            "adapter_plus_jax/peft.py",
            "    if s.act_layer:\n"
            "        y = activation(act)(y)\n"
            "    if not s.pre_dropout:\n"
            "        y = nn.Dropout(s.dropout)(y, deterministic=not train)\n",
            "    if not s.pre_dropout:\n"
            "        y = nn.Dropout(s.dropout)(y, deterministic=not train)\n"
            "    if s.act_layer:\n"
            "        y = activation(act)(y)\n",
        ),
        tests=(f"{PEFT}::test_training_mode_parity",),
        select="adapter_plus or houlsby or lora_post_dropout",
    ),
    Mutant(
        "prompt_dropout_shared",
        "one prompt-dropout mask shared by the whole batch instead of one per example",
        *_one(
            "adapter_plus_jax/model.py",
            "        prompt = jnp.broadcast_to(prompt.astype(x.dtype), "
            "(x.shape[0], t, x.shape[-1]))\n"
            "        prompt = nn.Dropout(self.prompt.dropout)(prompt, deterministic=not train)\n",
            "        prompt = nn.Dropout(self.prompt.dropout)(prompt, deterministic=not train)\n"
            "        prompt = jnp.broadcast_to(prompt.astype(x.dtype), "
            "(x.shape[0], t, x.shape[-1]))\n",
        ),
        tests=(
            f"{PEFT}::test_training_mode_parity[vpt]",
            f"{PEFT}::test_combined_training_mode_parity",
        ),
    ),
    Mutant(
        "bf16_bias_sum",
        "bfloat16 Dense adds its bias after rounding, so a trainable bias's gradient sums in bf16",
        *_one(
            "adapter_plus_jax/precision.py",
            "        if bias is not None:\n"
            "            y = y + bias\n"
            "        return y.astype(self.dtype).reshape(*x.shape[:-1], self.features)\n",
            "        y = y.astype(self.dtype)\n"
            "        if bias is not None:\n"
            "            y = y + bias.astype(self.dtype)\n"
            "        return y.reshape(*x.shape[:-1], self.features)\n",
        ),
        tests=(
            "tests/test_mixed_precision.py::test_bfloat16_peft_matches_torch_autocast[adapter_plus]",
        ),
    ),
    Mutant(
        "merge_values",
        "params.merge keeps the structure but zeroes the trainable values",
        *_one(
            "adapter_plus_jax/params.py",
            "    flat.update(traverse_util.flatten_dict(dict(trainable)))\n",
            "    flat.update({k: 0 * v for k, v in "
            "traverse_util.flatten_dict(dict(trainable)).items()})\n",
        ),
        tests=("tests/test_train.py::test_split_and_merge_round_trip",),
    ),
    Mutant(
        "npz_head_dropped",
        "the porter builds a headless model for a Google .npz checkpoint that has a head",
        *_one("adapter_plus_jax/port.py", "num_classes = npz_num_classes(path)", "num_classes = 0"),
        tests=("tests/test_port_weights.py::test_round_trip_npz",),
    ),
    Mutant(
        "fgvc_no_flip",
        "FGVC training images are never flipped",
        *_one(
            "adapter_plus_jax/data/fgvc.py",
            "flip = tf.random.stateless_uniform([], flip_seed) < 0.5",
            "flip = tf.random.stateless_uniform([], flip_seed) < 0.0",
        ),
        tests=("tests/test_fgvc.py::test_train_augmentation_flips_and_interpolates_at_random",),
    ),
    Mutant(
        "fgvc_bilinear_only",
        "FGVC training crops are always resized bilinear (never bicubic)",
        *_one(
            "adapter_plus_jax/data/fgvc.py",
            "bicubic = tf.random.stateless_uniform([], interp_seed) < 0.5",
            "bicubic = tf.random.stateless_uniform([], interp_seed) < 0.0",
        ),
        tests=("tests/test_fgvc.py::test_train_augmentation_flips_and_interpolates_at_random",),
    ),
    Mutant(
        "serving_wrong_task",
        "a mixed batch routes examples to the tasks in sorted order, not their own",
        *_one(
            "adapter_plus_jax/serving.py",
            "jax.tree.map(lambda a: a[ids], stacked)",
            "jax.tree.map(lambda a: a[jnp.sort(ids)], stacked)",
        ),
        tests=(SERVING,),
    ),
    Mutant(
        "serving_pad_front",
        "smaller ranks and heads are zero-padded in front instead of at the end",
        *_one(
            "adapter_plus_jax/serving.py",
            "[(0, t - s) for s, t in zip(value.shape, shape, strict=True)]",
            "[(t - s, 0) for s, t in zip(value.shape, shape, strict=True)]",
        ),
        tests=(SERVING,),
    ),
    Mutant(
        "serving_backbone_vector_zeroed",
        "in a mixed batch, a task that leaves a bias or LayerNorm to the backbone gets zeros",
        *_one(
            "adapter_plus_jax/serving.py",
            "return np.asarray(backbone[key], np.float32)",
            "return np.zeros(shape, np.float32)",
        ),
        tests=(
            "tests/test_serving.py::test_tasks_of_trained_backbone_vectors_join_the_mixed_batch",
        ),
    ),
    Mutant(
        "serving_fixed_scaling_lost",
        "a task's fixed adapter/LoRA scaling becomes 1 in the shared model",
        *_one(
            "adapter_plus_jax/serving.py",
            "return np.full(shape, spec.scaling, np.float32)",
            "return np.ones(shape, np.float32)",
        ),
        tests=(SERVING,),
    ),
    Mutant(
        "chunk_mean_per_chunk",
        "the chunked train step averages each chunk's loss over the chunk, not over the batch",
        *_one(
            "adapter_plus_jax/train.py",
            "return jnp.sum(losses * m) / count, mask_classes(logits, num_classes)",
            "return jnp.sum(losses * m) / jnp.maximum(m.sum(), 1), "
            "mask_classes(logits, num_classes)",
        ),
        tests=(f"{CHUNKED_STEP}[7-3]",),
    ),
    Mutant(
        "chunk_keys_from_zero",
        "every chunk of a train step draws the masks of the batch's first examples",
        *_one(
            "adapter_plus_jax/train.py",
            "grad_fn(params, i * chunk, *chunk_batch)",
            "grad_fn(params, 0, *chunk_batch)",
        ),
        tests=(f"{CHUNKED_STEP}[6-2]",),
    ),
    Mutant(
        "example_keys_shared",
        "the examples of a batch share one dropout/drop-path key",
        *_one(
            "adapter_plus_jax/train.py",
            "index = start + jnp.arange(n)",
            "index = start + jnp.zeros(n, jnp.int32)",
        ),
        tests=("tests/test_train.py::test_examples_draw_their_own_masks",),
    ),
    Mutant(
        "run_trains_unnormalised",
        "runs train on the loaders' [0, 255] images without normalising them",
        *_one(
            "adapter_plus_jax/experiment.py",
            "label_smoothing, rng, input_fn=input_fn(module))",
            "label_smoothing, rng)",
        ),
        tests=(RUN_STEPS,),
    ),
    Mutant(
        "run_evaluates_unnormalised",
        "runs evaluate the loaders' [0, 255] images without normalising them",
        *_one(
            "adapter_plus_jax/experiment.py",
            "return train.make_eval_step(module, input_fn=input_fn(module))",
            "return train.make_eval_step(module)",
        ),
        tests=(RUN_STEPS,),
    ),
    Mutant(
        "padded_classes_in_loss",
        "the padded head's extra classes take part in the softmax of the loss",
        *_one(
            "adapter_plus_jax/train.py",
            "log_p = jax.nn.log_softmax(jnp.where(real, logits, -jnp.inf))",
            "log_p = jax.nn.log_softmax(logits)",
        ),
        tests=("tests/test_padded_head.py::test_padded_training_equals_unpadded",),
    ),
    Mutant(
        "padded_classes_predicted",
        "evaluation's argmax also looks at the padded head's extra classes",
        *_one(
            "adapter_plus_jax/train.py",
            "logits = mask_classes(forward(params, images), num_classes)",
            "logits = forward(params, images)",
        ),
        tests=("tests/test_padded_head.py::test_padded_training_equals_unpadded",),
    ),
    Mutant(
        "exif_orientation_ignored",
        "photos are read as stored, sideways, not as their EXIF orientation shows them",
        *_one(
            "adapter_plus_jax/images.py",
            "        image = ImageOps.exif_transpose(image)\n",
            "",
        ),
        tests=(
            "tests/test_photos.py::test_exif_orientation_is_applied",
            "tests/test_photos.py::test_sideways_photo_predicts_as_upright",
        ),
    ),
    Mutant(
        "reexec_loops",
        "the huge-page restart does not see that the process already has the tunable",
        *_one(
            "adapter_plus_jax/backend.py",
            '    if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):\n'
            "        return False\n",
            "",
        ),
        tests=("tests/test_backend.py::test_never_restarts_a_process_that_has_the_tunable",),
    ),
    Mutant(
        "fused_attention_pad_unmasked",
        "the token padded for cuDNN's attention is attended to like a real one",
        *_one(
            "adapter_plus_jax/layers.py",
            "q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,",
            "q, k, v,",
        ),
        tests=(
            "tests/test_mixed_precision.py::"
            "test_fused_attention_pads_odd_token_counts_without_changing_the_result[7]",
        ),
    ),
    Mutant(
        "auto_attention_in_float32",
        "attention='auto' takes cuDNN's kernel in float32 too, leaving the reference's arithmetic",
        *_one(
            "adapter_plus_jax/backend.py",
            "        and low_precision(dtype) and not attn_drop_rate\n",
            "        and not attn_drop_rate\n",
        ),
        tests=(
            "tests/test_backend.py::"
            "test_auto_attention_takes_cudnn_only_where_it_runs[float32-0.0-64-9.0-xla]",
        ),
    ),
    Mutant(
        "dora_norm_not_detached",
        "DoRA's weight norm passes gradients (Liu et al. and peft treat it as a constant)",
        *_one(TUNING, "norm = jax.lax.stop_gradient(jnp.linalg.norm(weight, axis=0))",
              "norm = jnp.linalg.norm(weight, axis=0)"),  # fmt: skip
        tests=(PEFT_METHODS,),
        select="dora",
    ),
    Mutant(
        "ssf_shift_before_scale",
        "SSF shifts before it scales: (y + beta) * gamma",
        *_one(TUNING, "return y * gamma.astype(y.dtype) + beta.astype(y.dtype)",
              "return (y + beta.astype(y.dtype)) * gamma.astype(y.dtype)"),  # fmt: skip
        tests=(f"{METHODS_T}::test_ssf_is_a_scale_and_shift_after_each_operation",),
    ),
    Mutant(
        "ia3_wrong_side",
        "(IA)3 scales the outputs of its feed-forward targets and the inputs of the others",
        TUNING,
        (('if kind == "ia3" and self.layer in s.ia3_inputs:',
          'if kind == "ia3" and self.layer not in s.ia3_inputs:'),
         ('if kind == "ia3" and self.layer not in s.ia3_inputs:\n            y = y *',
          'if kind == "ia3" and self.layer in s.ia3_inputs:\n            y = y *')),  # fmt: skip
        tests=(PEFT_METHODS,),
        select="ia3",
    ),
    Mutant(
        "lora_linear_unscaled",
        "LoRA on a linear layer adds B A without alpha / rank",
        *_one(TUNING, "y = y + s.scaling * low", "y = y + low"),
        tests=(PEFT_METHODS,),
        select="lora",
    ),
    Mutant(
        "vera_lambda_d_dropped",
        "VeRA's lambda_d (the scaling between its two random matrices) is left out",
        *_one(TUNING, "a.astype(dtype)) * lam_d.astype(dtype)",
              "a.astype(dtype)) + 0 * lam_d.astype(dtype)"),  # fmt: skip
        tests=(PEFT_METHODS,),
        select="vera",
    ),
    Mutant(
        "bitfit_without_norm_biases",
        "BitFit leaves the LayerNorms' biases frozen",
        *_one("adapter_plus_jax/params.py", '"bitfit": frozenset({"head", "bias", "norm_bias"}),',
              '"bitfit": frozenset({"head", "bias"}),'),  # fmt: skip
        tests=(f"{METHODS_T}::test_bitfit_and_ln_tune_train_what_their_papers_train",
               f"{METHODS_T}::test_trainable_counts_on_vit_b16"),  # fmt: skip
        select="(papers_train and biases) or counts",
    ),
    Mutant(
        "ln_tune_scales_only",
        "LN-tune trains the LayerNorms' scales but not their biases",
        *_one("adapter_plus_jax/params.py", '"ln_tune": frozenset({"head", "norm", "norm_bias"}),',
              '"ln_tune": frozenset({"head", "norm"}),'),  # fmt: skip
        tests=(f"{METHODS_T}::test_bitfit_and_ln_tune_train_what_their_papers_train",
               f"{METHODS_T}::test_trainable_counts_on_vit_b16"),  # fmt: skip
        select="(papers_train and norms) or counts",
    ),
    Mutant(
        "fact_tk_core_columns",
        "FacT-TK's q, k, v cores taken from columns 1..3 of the block's 12 (proj's in q's place)",
        *_one("adapter_plus_jax/fact.py", "return _xp(cores).moveaxis(cores[:, :, 0:3], -1, 0)",
              "return _xp(cores).moveaxis(cores[:, :, 1:4], -1, 0)"),  # fmt: skip
        tests=(f"{METHODS_T}::test_fact_computes_what_its_papers_code_computes",),
        select="fact_tk",
    ),
    Mutant(
        "fact_fc1_chunks_transposed",
        "FacT splits fc1's update into r groups of 4 instead of 4 chunks of r",
        *_one("adapter_plus_jax/fact.py", "out = (drop(ux @ core).reshape(*lead, 4, r) @ v)",
              "out = (drop(ux @ core).reshape(*lead, r, 4).swapaxes(-1, -2) @ v)"),  # fmt: skip
        tests=(f"{METHODS_T}::test_fact_computes_what_its_papers_code_computes",),
        select="fact_tt",
    ),
    Mutant(
        "ctrl_c_cuts_the_save",
        "Ctrl-C during a checkpoint save interrupts it at once, leaving the step unwritten",
        *_one("adapter_plus_jax/checkpoint.py", "            with _interrupts_deferred():",
              "            with contextlib.nullcontext():"),  # fmt: skip
        tests=("tests/test_workdir.py::test_ctrl_c_during_a_save_stops_after_it",),
    ),
]


def work_tree_copy(dest: Path) -> Path:
    """Copy git's tracked and untracked (not ignored) files of the work tree to `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():  # configs/ -> adapter_plus_jax/configs
            os.symlink(os.readlink(src), dest / rel)
        elif src.is_file():
            shutil.copy2(src, dest / rel)
    return dest


def run_tests(root: Path, mutant: Mutant) -> tuple[int, int, int, float]:
    """(returncode, passed, failed, seconds) of the mutant's tests run in `root`."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *mutant.tests]
    if mutant.select:
        cmd += ["-k", mutant.select]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""

    def count(word: str) -> int:
        m = re.search(rf"(\d+) {word}", summary)
        return int(m.group(1)) if m else 0

    return done.returncode, count("passed"), count("failed"), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--baseline", action="store_true", help="run the tests on the unchanged code instead"
    )
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTANTS}
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:28s} {m.bug}")
        return 0
    unknown = sorted(set(args.names) - set(known))
    if unknown:
        parser.error(f"unknown mutant(s) {unknown}; see --list")
    chosen = [known[n] for n in args.names] or MUTANTS
    ok, good = True, 0
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
            root = work_tree_copy(Path(tmp))
            if not args.baseline:
                m.apply(root)
            code, passed, failed, seconds = run_tests(root, m)
        if args.baseline:
            verdict = "passes" if code == 0 and failed == 0 and passed else "FAILS"
        elif code == 1 and failed and not passed:
            verdict = "caught"
        elif code == 1 and failed:
            verdict = "PARTLY (some tests pass)"
        elif code == 0:
            verdict = "MISSED"
        else:
            verdict = f"ERROR (pytest exit {code})"
        ok &= verdict in ("caught", "passes")
        good += verdict in ("caught", "passes")
        counts = f"{failed} failed, {passed} passed"
        print(f"{m.name:28s} {verdict:10s} {counts} ({seconds:.0f} s)", flush=True)
    print(f"\n{good} of {len(chosen)} as expected")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
