"""The cupy backend without a GPU: its Python code with NumPy standing in for CuPy (the
"shim": xp=numpy), its kernels under numba's CUDA simulator, bf16 rounding, checkpoints moving
between backends, the one-line errors, and that a CPU run imports none of it. The same checks
on a real GPU: test_on_gpu (skips with a reason without one) and tests/sim_kernels.py."""
import os
import subprocess
import sys

import numpy as np
import pytest

from randygpt.checkpoint import load_checkpoint
from randygpt.cli import main
from randygpt.config import ModelConfig, TrainConfig
from randygpt.data import builtin_sample_text
from randygpt.errors import UserError
from randygpt.model import GPT
from randygpt.ops import contract, reference
from randygpt.ops.cupy import precision
from randygpt.ops.cupy.precision import Matmul, bf16_bits, round_to_bf16
from randygpt.optim import AdamW
from randygpt.runs import plan_run
from randygpt.step import train_step
from randygpt.train import train
from gradcheck import rel_error

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
TEXT = builtin_sample_text()
QUIET = dict(sample_tokens=0, log=lambda *_: None)
RNG = np.random.default_rng(3)


def shim(**options):
    return contract.get_backend("cupy", xp=np, kernels=False, **options)


def tiny():
    m = ModelConfig(block_size=16, n_layer=2, n_embd=16, n_head=2, dropout=0.1)
    t = TrainConfig(iters=12, batch_size=4, lr=3e-3, warmup=2, decay_frac=0.5, eval_interval=4,
                    eval_iters=2, seed=9)
    return m, t


# --------------------------------------------------------------------------------------------
# bf16: the rounding, and linear's bf16 path

def test_bf16_rounding_matches_torch_bfloat16():
    torch = pytest.importorskip("torch")
    x = np.concatenate([RNG.standard_normal(20_000).astype(np.float32) * 10.0 ** RNG.integers(
        -30, 30, 20_000), np.float32([0.0, -0.0, np.inf, -np.inf, 3.4e38, 1e-40, -1e-42]),
        # ties: a kept lowest bit of 0 and of 1, exactly half way
        np.array([0x3F808000, 0x3F818000, 0x3F80FFFF], dtype=np.uint32).view(np.float32)])
    want = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    got = round_to_bf16(x)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert (got.view(np.uint32) & 0xFFFF == 0).all()
    nan = round_to_bf16(np.float32([np.nan]))
    assert np.isnan(nan[0]) and bf16_bits(np.float32([np.nan]))[0] & 0x7F80 == 0x7F80


def test_linear_bf16_path_is_float32_math_on_bf16_rounded_operands():
    be = shim(dtype="bf16")
    x, w, dout = (RNG.standard_normal(s).astype(np.float32) for s in ((2, 5, 12), (12, 7),
                                                                       (2, 5, 7)))
    out, cache = be.linear_forward(x, w)
    xr, wr, dr = round_to_bf16(x), round_to_bf16(w), round_to_bf16(dout)
    np.testing.assert_array_equal(out, (xr.reshape(10, 12) @ wr).reshape(2, 5, 7))
    dx, dw = be.linear_backward(dout, cache)
    np.testing.assert_array_equal(dx, (dr.reshape(10, 7) @ wr.T).reshape(2, 5, 12))
    np.testing.assert_array_equal(dw, xr.reshape(10, 12).T @ dr.reshape(10, 7))
    # and it is not float32 math: bf16 keeps 8 bits of mantissa
    err = rel_error(out, x @ w)
    assert 1e-4 < err < 2e-2


def test_float32_linear_is_the_reference():
    x, w, dout = (RNG.standard_normal(s).astype(np.float32) for s in ((3, 4, 6), (6, 5),
                                                                       (3, 4, 5)))
    be = shim()
    out, cache = be.linear_forward(x, w)
    want, ref_cache = reference.linear_forward(x, w)
    assert rel_error(out, want) < 1e-6
    for g, r in zip(be.linear_backward(dout, cache), reference.linear_backward(dout, ref_cache)):
        assert rel_error(g, r) < 1e-6


# --------------------------------------------------------------------------------------------
# The backend's whole path with NumPy standing in for CuPy

@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bf16", 5e-2)])
def test_shim_trains_like_the_reference(dtype, tol):
    cfg = ModelConfig(vocab_size=13, block_size=8, n_layer=2, n_embd=16, n_head=2, dropout=0.1)
    x, y = RNG.integers(0, 13, (3, 8)), RNG.integers(0, 13, (3, 8))
    y[0, 6:] = -1                                          # padding
    runs = {}
    for name, be in (("reference", contract.get_backend("reference")), ("shim", shim(
            dtype=dtype))):
        model = GPT(cfg, seed=1, backend=be)
        opt = AdamW(model.params.flat, model.decay_mask(), backend=be)
        drop = np.random.default_rng(4)
        losses = [train_step(model, opt, be.to_device(x), be.to_device(y), 1e-2, grad_clip=0.5,
                             dropout_rng=drop).loss for _ in range(4)]
        runs[name] = (losses, model.params.flat, opt.m)
    (ref_losses, ref_p, ref_m), (losses, p, m) = runs["reference"], runs["shim"]
    assert losses[-1] < losses[0] - 0.05                 # it learned
    np.testing.assert_allclose(losses, ref_losses, rtol=tol)
    assert rel_error(p, ref_p) < tol and rel_error(m, ref_m) < 20 * tol


def test_checkpoints_move_between_reference_and_shim(tmp_path):
    # reference 4 steps -> resume on the shim to 8 -> resume on the reference to 12, against
    # 12 straight on the reference: the same run to float32 round-off (not bit for bit:
    # the shim's linear takes a 2-D product, the reference a batched one)
    straight = train(plan_run(*tiny(), text=TEXT, out_dir=str(tmp_path / "a")),
                     backend="reference", **QUIET)
    out = str(tmp_path / "b")
    train(plan_run(*tiny(), text=TEXT, out_dir=out), backend="reference", stop_after=4, **QUIET)
    c = load_checkpoint(out)
    assert c.iter == 4
    mid = train(plan_run(resume=c, text=TEXT, out_dir=out), backend=shim(), stop_after=8,
                **QUIET)
    assert mid.iters_done == 8 and mid.model.backend.name == "cupy"
    c = load_checkpoint(out)
    assert c.iter == 8 and c.model.params.flat.dtype == np.float32
    last = train(plan_run(resume=c, text=TEXT, out_dir=out), backend="reference", **QUIET)
    assert last.iters_done == 12
    assert rel_error(last.model.params.flat, straight.model.params.flat) < 1e-4
    assert abs(last.val_loss - straight.val_loss) < 1e-4


# --------------------------------------------------------------------------------------------
# The kernels, under numba's CUDA simulator (a subprocess: the simulator is chosen when
# numba.cuda is first imported)

def test_kernels_match_the_reference_under_the_cuda_simulator():
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (the test extra)")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", RANDYGPT_GPU="0")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        os.path.join(HERE, "sim_kernels.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout


def test_simulated_kernel_backend_trains_like_the_reference():
    # the whole model on the kernels (simulated): the same losses as the reference
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (the test extra)")
    code = (
        "import numpy as np\n"
        "from randygpt.config import ModelConfig\nfrom randygpt.model import GPT\n"
        "from randygpt.ops.contract import get_backend\nfrom randygpt.optim import AdamW\n"
        "from randygpt.step import train_step\n"
        "cfg = ModelConfig(vocab_size=7, block_size=4, n_layer=1, n_embd=8, n_head=2)\n"
        "x = np.array([[1, 2, 3, 4], [5, 6, 0, 1]]); y = np.roll(x, -1, axis=1)\n"
        "for be in (get_backend('reference'), get_backend('cupy', xp=np)):\n"
        "    m = GPT(cfg, seed=2, backend=be)\n"
        "    o = AdamW(m.params.flat, m.decay_mask(), backend=be)\n"
        "    r = np.random.default_rng(1)\n"
        "    print(be.options.get('kernels'), *[float(train_step(m, o, x, y, 1e-2, "
        "grad_clip=1.0, dropout_rng=r).loss) for _ in range(2)])\n")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    ref, sim = (line.split() for line in r.stdout.strip().splitlines())
    assert ref[0] == "None" and sim[0] == "True"
    np.testing.assert_allclose([float(v) for v in sim[1:]], [float(v) for v in ref[1:]],
                               rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Errors, and what a CPU run imports

def test_cupy_missing_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "cupy", None)          # import cupy -> ImportError
    with pytest.raises(UserError) as e:
        contract.get_backend("cupy")
    assert e.value.field == "backend" and "pip install -e '.[cuda]'" in str(e.value)
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    assert main(["train", "--data", str(data), "--backend", "cupy", "--iters", "1",
                 "--out", str(tmp_path / "r"), "--no-progress", "--sample-tokens", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--backend cupy needs CuPy" in err[0], err
    assert not (tmp_path / "r").exists()


def test_bad_options_are_user_errors(capsys, tmp_path):
    for options, field in ((dict(dtype="fp8"), "dtype"), (dict(dtype="bf16", tf32=True), "tf32"),
                           (dict(colour=1), "backend")):
        with pytest.raises(UserError) as e:
            contract.get_backend("cupy", xp=np, **options)
        assert e.value.field == field
    assert main(["train", "--dtype", "bf16", "--iters", "1", "--out", str(tmp_path / "r")]) == 2
    assert "--dtype bf16 needs --backend cupy" in capsys.readouterr().err


def test_a_cpu_training_run_imports_nothing_of_the_gpu_backend(tmp_path):
    code = ("import sys\nfrom randygpt.cli import main\n"
            f"assert main(['train', '--preset', 'tiny', '--iters', '2', '--eval-iters', '1', "
            f"'--out', {str(tmp_path / 'r')!r}, '--no-progress', '--sample-tokens', '5']) == 0\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupyx', "
            "'numba_cuda', 'cuda') or m.startswith(('numba.cuda', 'randygpt.ops.cupy')))\n"
            "print('GPU modules:', bad)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    assert "GPU modules: []" in r.stdout, r.stdout


# --------------------------------------------------------------------------------------------
# On a GPU (benchmarks/gpu_check.sh runs this with RANDYGPT_GPU=1)

def _gpu():
    if os.environ.get("RANDYGPT_GPU") != "1":
        pytest.skip("needs a CUDA GPU: set RANDYGPT_GPU=1 on a machine with one "
                    "(benchmarks/gpu_check.sh does)")
    try:
        return contract.get_backend("cupy")
    except UserError as e:
        pytest.skip(f"needs a CUDA GPU: {e}")


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bf16", 5e-2)])
def test_on_gpu_trains_like_the_reference(dtype, tol, tmp_path):
    _gpu()
    gpu = contract.get_backend("cupy", dtype=dtype)
    straight = train(plan_run(*tiny(), text=TEXT, out_dir=str(tmp_path / "a")),
                     backend="reference", **QUIET)
    out = str(tmp_path / "b")
    train(plan_run(*tiny(), text=TEXT, out_dir=out), backend=gpu, stop_after=6, **QUIET)
    last = train(plan_run(resume=load_checkpoint(out), text=TEXT, out_dir=out),
                 backend="reference", **QUIET)                  # GPU checkpoint -> CPU
    assert abs(last.val_loss - straight.val_loss) < tol * abs(straight.val_loss)
    assert rel_error(last.model.params.flat, straight.model.params.flat) < 10 * tol


def test_on_gpu_bf16_gemm_is_float32_math_on_rounded_operands():
    _gpu()
    import cupy
    a, b = (RNG.standard_normal(s).astype(np.float32) for s in ((64, 96), (96, 80)))
    want = round_to_bf16(a).astype(np.float64) @ round_to_bf16(b).astype(np.float64)
    mm = Matmul("bf16", cupy, cublas=True)
    for ta, tb in ((False, False), (True, False), (False, True)):
        x = a.T.copy() if ta else a
        y = b.T.copy() if tb else b
        got = mm(mm.operand(cupy.asarray(x)), mm.operand(cupy.asarray(y)), ta, tb).get()
        assert rel_error(got, want) < 1e-5, (ta, tb)
    assert precision.CUDA_R_16BF == 14
