"""Model benchmarks: batched Lovasz vs the original per-image loop, SDPA vs plain OC attention, whole train steps.

Peak memory: each side runs once more in a fresh subprocess (`python benchmarks/bench_model.py --peak CASE
SIDE`) with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_), so every large tensor is its own mapping and
is unmapped on free; the child resets the kernel's RSS high-water mark (/proc/self/clear_refs) after setup and a
warm-up run, runs the side once, and reports VmHWM - VmRSS: the extra resident memory the step needed (MB).
Linux only; elsewhere the peak columns are left out.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.baselines import lovasz_hinge_original, symmetric_lovasz_original
from benchmarks.run import Case
from saltkit.losses import DeepSupervisionLoss, lovasz_hinge, symmetric_lovasz
from saltkit.networks import ObjectContextBlock, SaltUNet
from saltkit.networks.blocks import set_inplace_activations

ROOT = Path(__file__).resolve().parents[1]


def random_masks(batch: int, size: int, empty: int = 0, seed: int = 0) -> torch.Tensor:
    """(B, 1, size, size) {0, 1} blob masks (smoothed noise thresholded); the first `empty` are empty."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 1, size // 8, size // 8, generator=g)
    masks = (torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear") > 0.3).float()
    masks[:empty] = 0
    return masks


# ---------------------------------------------------------------- Lovasz
def lovasz_setup() -> dict:
    g = torch.Generator().manual_seed(0)
    target = random_masks(32, 128, empty=8)
    logits = 3 * (2 * target - 1) + 2 * torch.randn(target.shape, generator=g)
    return {"logits": logits, "target": target}


def lovasz_fwd_bwd(loss_fn):
    def run(inputs: dict) -> tuple[float, torch.Tensor]:
        x = inputs["logits"].clone().requires_grad_()
        loss = loss_fn(x, inputs["target"])
        loss.backward()
        return loss.item(), x.grad

    return run


def compare_loss(ours, base) -> dict:
    """Relative differences of the values and of the gradients (max abs diff / max abs gradient); pixels whose
    hinge errors tie get their weights in the sort's tie order, which differs between sorts."""
    return {"value_rel_diff": abs(ours[0] - base[0]) / abs(base[0]),
            "grad_rel_diff": ((ours[1] - base[1]).abs().max() / base[1].abs().max()).item()}


# ---------------------------------------------------------------- OC block
def oc_setup() -> dict:
    """The last decoder's OC block shape: batch 4, 32 channels at 64 x 64, key/value 16, dropout 0.2."""
    torch.manual_seed(0)
    block = ObjectContextBlock(32, 16, 16, dropout=0.2)
    # the output projection starts at zero; give it weights so the attention path shows in the outputs
    torch.nn.init.normal_(block.out.weight, std=0.1)
    x = torch.randn(4, 32, 64, 64)
    plain = copy.deepcopy(block)
    plain.attention = "plain"
    return {"ours": block, "baseline": plain, "x": x}


def oc_side(side: str):
    def run(inputs: dict) -> torch.Tensor:
        block = inputs[side].train()
        block.zero_grad(set_to_none=True)
        x = inputs["x"].clone().requires_grad_()
        block(x).sum().backward()
        return x.grad

    return run


def oc_eval_diff() -> float:
    inputs = oc_setup()
    with torch.no_grad():
        a = inputs["ours"].eval()(inputs["x"])
        b = inputs["baseline"].eval()(inputs["x"])
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- train step
def step_setup(backbone: str, batch: int = 4, size: int = 128) -> dict:
    """Ours (SDPA, low-resolution hypercolumn, in-place ABN, batched Lovasz, fused AdamW) and the plain reference
    (plain attention, full-resolution concatenated hypercolumn, out-of-place ABN, per-image Lovasz, for-loop AdamW),
    same initial weights; pad variant loss (centre 101 crop)."""
    torch.manual_seed(0)
    net = SaltUNet(backbone, pretrained=None)
    ref = copy.deepcopy(net)
    ref.set_attention("plain")
    ref.set_hypercolumn("concat")
    set_inplace_activations(ref, False)
    return {
        "x": torch.rand(batch, 3, size, size),
        "target": random_masks(batch, size, empty=1),
        "ours": (net, torch.optim.AdamW(net.parameters(), 1e-4, fused=True), DeepSupervisionLoss(center_crop=101)),
        "baseline": (ref, torch.optim.AdamW(ref.parameters(), 1e-4, foreach=False),
                     DeepSupervisionLoss(center_crop=101, reference=True)),
    }


def step_side(side: str):
    def run(inputs: dict) -> float:
        net, opt, loss_fn = inputs[side]
        net.train()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(inputs.get("x_" + side, inputs["x"])), inputs["target"])
        loss.backward()
        opt.step()
        return loss.item()

    return run


# ---------------------------------------------------------------- peak memory (subprocess)
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_peak_here(case_name: str, side: str) -> float:
    """In this process: setup, one warm-up, reset the high-water mark, one run -> extra peak RSS in MB."""
    case = {c.name: c for c in CASES}[case_name]
    inputs = case.setup()
    fn = case.ours if side == "ours" else case.baseline
    fn(inputs)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kb("VmRSS")
    fn(inputs)
    return (_status_kb("VmHWM") - before) / 1024


def peak_mb(case_name: str, side: str) -> float | None:
    """Extra peak RSS (MB) of one run of `side`, measured in a fresh subprocess; None where unsupported."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peak", case_name, side]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def with_peaks(case_name: str, extra=None):
    def compare(ours, base) -> dict:
        row = dict(extra(ours, base)) if extra else {}
        row["peak_mb_ours"] = peak_mb(case_name, "ours")
        row["peak_mb_baseline"] = peak_mb(case_name, "baseline")
        return row

    return compare


def step_extra(batch: int):
    return lambda ours, base: {"batch": batch, "loss_ours": ours, "loss_baseline": base}


def cpu_recipe_step_setup() -> dict:
    """The CPU recipe's train step as the bundle builds it (train.json + configs/cpu.json + configs/pad.json: network,
    loss, optimizer, one batch of the shipped sample) and its reference mode: the same weights and optimizer state
    with plain attention, the concatenated hypercolumn, out-of-place ABN, the per-image Lovasz loop, the for-loop AdamW
    and the default (NCHW) memory layout."""
    from benchmarks.bench_pipeline import setup as pipeline_setup

    inputs = pipeline_setup()
    ref, ref_opt = copy.deepcopy((inputs["network"], inputs["optimizer"]))  # the copy's optimizer holds ref's weights
    ref.to(memory_format=torch.contiguous_format)  # the reference runs in the default layout
    for group in ref_opt.param_groups:  # and the for-loop AdamW, as in step_setup
        group.update(fused=False, foreach=False)
    ref.set_attention("plain")
    ref.set_hypercolumn("concat")
    set_inplace_activations(ref, False)
    ref_loss = copy.copy(inputs["loss"])
    ref_loss.reference = True
    return {
        "x": inputs["batch"]["image"], "target": inputs["batch"]["label"],
        "x_ours": inputs["batch"]["image"].to(memory_format=inputs["memory_format"]),
        "ours": (inputs["network"], inputs["optimizer"], inputs["loss"]), "baseline": (ref, ref_opt, ref_loss),
    }


def cpu_network_forms_setup() -> dict:
    """The CPU recipe's train step with its cheaper network forms (configs/cpu.json: `fine_context_scale` 2,
    `deep_supervision` native) against the same step with the recipe's forms (1, hypercolumn): same weights, same
    batch, same fast code on both sides; what the two keys buy per step (they change the function, so no equality)."""
    from benchmarks.bench_pipeline import setup as pipeline_setup

    inputs = pipeline_setup()
    net = inputs["network"]
    recipe = SaltUNet(**{**net.arch, "fine_context_scale": 1, "deep_supervision": "hypercolumn"})
    recipe.load_state_dict(net.state_dict())
    recipe.to(memory_format=inputs["memory_format"])
    recipe_opt = copy.deepcopy(inputs["optimizer"])  # same hyper-parameters and fused kernel, on recipe's weights
    recipe_opt.param_groups[0]["params"] = list(recipe.parameters())
    recipe_opt.state.clear()
    assert net.arch["fine_context_scale"] == 2 and net.arch["deep_supervision"] == "native", net.arch
    return {"x": inputs["batch"]["image"].to(memory_format=inputs["memory_format"]), "target": inputs["batch"]["label"],
            "ours": (net, inputs["optimizer"], inputs["loss"]), "baseline": (recipe, recipe_opt, inputs["loss"])}


def cpu_recipe_bf16_setup() -> dict:
    """The CPU recipe's train step as the bundle builds it, with bf16 autocast (`amp: true`, so bf16 even where
    `amp: auto` picks float32: the trainer's AutocastInferer, float32 loss, fused AdamW on float32 weights) and in
    float32 (`amp: false`): the same weights, optimizer state and batch, channels_last on both sides."""
    from benchmarks.bench_pipeline import setup as pipeline_setup
    from saltkit.inference import AutocastInferer
    from saltkit.precision import choose_precision

    inputs = pipeline_setup(amp="true")
    assert inputs["inferer"].dtype == torch.bfloat16, inputs["inferer"].dtype
    net, opt = copy.deepcopy((inputs["network"], inputs["optimizer"]))  # the copy's optimizer holds net's weights
    return {"x": inputs["batch"]["image"].to(memory_format=inputs["memory_format"]), "target": inputs["batch"]["label"],
            "ours": (inputs["network"], inputs["optimizer"], inputs["loss"], inputs["inferer"]),
            "baseline": (net, opt, inputs["loss"], AutocastInferer(dtype=None)),
            "auto_here": choose_precision("auto", "cpu").message}


def inferer_step_side(side: str):
    """One train step as MONAI's SupervisedTrainer runs it: loss(inferer(x, network), target), backward, step."""
    def run(inputs: dict) -> float:
        net, opt, loss_fn, inferer = inputs[side]
        net.train()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(inferer(inputs["x"], net), inputs["target"])
        loss.backward()
        opt.step()
        return loss.item()

    return run


ORIGINAL = "the original's algorithm"
REFERENCE = "reference mode (plain attention, concatenated hypercolumn, per-image Lovasz loop)"

CASES = [
    Case("lovasz_symmetric_b32_128", lovasz_setup,
         lovasz_fwd_bwd(symmetric_lovasz), lovasz_fwd_bwd(symmetric_lovasz_original),
         compare=compare_loss, repeat=5, baseline_name=ORIGINAL,
         notes="symmetric elu Lovasz fwd+bwd, batch 32 of 128x128: one packed-key numpy sort for both terms, "
               "analytic gradient; baseline: per-image loop, each term on its own"),
    Case("lovasz_hinge_b32_128", lovasz_setup, lovasz_fwd_bwd(lovasz_hinge),
         lovasz_fwd_bwd(lovasz_hinge_original), compare=compare_loss, repeat=5, baseline_name=ORIGINAL,
         notes="elu Lovasz hinge fwd+bwd, batch 32 of 128x128: one (B, HW) sort vs the per-image loop"),
    Case("oc_block_b4_32ch_64px", oc_setup, oc_side("ours"), oc_side("baseline"),
         compare=with_peaks("oc_block_b4_32ch_64px", lambda o, b: {"eval_max_abs_diff": oc_eval_diff()}),
         repeat=5, baseline_name="plain softmax(QK^T)V attention",
         notes="OC block fwd+bwd (last decoder shape): SDPA vs plain softmax(QK^T)V"),
    Case("step_cpu_recipe", cpu_recipe_step_setup, step_side("ours"), step_side("baseline"),
         compare=lambda ours, base: {"loss_ours": ours, "loss_baseline": base}, repeat=5,
         baseline_name=REFERENCE[:-1] + ", for-loop AdamW, NCHW)",
         extra={"recipe": "train.json + configs/cpu.json + configs/pad.json"},
         notes="the CPU recipe's train step (fwd, loss, bwd, optimizer) as the bundle builds it (channels_last, fused "
               "AdamW), on a sample batch; baseline: the same network and optimizer in reference mode"),
    Case("step_cpu_network_forms", cpu_network_forms_setup, step_side("ours"), step_side("baseline"),
         compare=lambda ours, base: {"loss_ours": ours, "loss_baseline": base}, repeat=5,
         baseline_name="the recipe's network forms (fine_context_scale 1, deep_supervision hypercolumn)",
         extra={"recipe": "train.json + configs/cpu.json + configs/pad.json"},
         notes="the CPU recipe's train step with its cheaper network forms (decoder1's attention on the 2x2-pooled map, "
               "deep-supervision heads at their own sizes) vs the recipe's forms, same weights and fast code"),
    Case("step_cpu_recipe_bf16", cpu_recipe_bf16_setup, inferer_step_side("ours"), inferer_step_side("baseline"),
         compare=lambda ours, base: {"loss_ours": ours, "loss_baseline": base}, repeat=5,
         describe=lambda inputs: {"amp_auto_here": inputs["auto_here"]},
         baseline_name="the same step in float32 (amp false)",
         extra={"recipe": "train.json + configs/cpu.json + configs/pad.json"},
         notes="the CPU recipe's train step (fwd, loss, bwd, optimizer) as the bundle builds it with bf16 autocast "
               "(amp true: the trainer's AutocastInferer, float32 loss and weights) vs float32, same weights"),
    Case("step_senet154_b4_128", lambda: step_setup("senet154"), step_side("ours"), step_side("baseline"),
         compare=with_peaks("step_senet154_b4_128", step_extra(4)), repeat=2, baseline_name=REFERENCE,
         notes="SaltUNet senet154 train step, batch 4 at 128 (input upsampled to 256), fused AdamW vs for-loop "
               "AdamW; 2 timed runs per side after a warm-up"),
]

if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--peak":
        print(json.dumps({"peak_mb": measure_peak_here(sys.argv[2], sys.argv[3])}))
    else:
        sys.exit("usage: bench_model.py --peak CASE SIDE (run the benchmarks with benchmarks/run.py)")
