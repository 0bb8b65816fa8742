"""The training loop under several processes (issue 13, "Beyond one machine"): two gloo processes on
the CPU train a tiny UNet and get the weights of one process at the same global batch; only rank 0
writes to the model store."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from diffusion_core import distributed as D
from diffusion_core.data.digits import batches
from diffusion_core.process.gaussian import GaussianDiffusion
from diffusion_core.profiles import Profile
from diffusion_core.train import TrainConfig, train

WORLD = 2
STEPS = 4
TIMEOUT_S = 120  # never hang: the processes are killed after this


# ----------------------------------------------------------------------------- what both sides train
def _tiny_unet(dtype: torch.dtype = torch.float32):
    """The book's digit UNet at width 16 on 8x8 images, no dropout (about 90k parameters)."""
    from diffusion_core.models.unet import UNet2D
    from diffusion_core.recipes.digits import unet_config

    torch.manual_seed(0)
    return UNet2D(unet_config(width=16, resolution=8, dropout=0.0)).to(dtype)


def _data(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(dtype)


def _train_tiny(batch_size: int, dtype: torch.dtype = torch.float32, progress: bool = False):
    """A few steps of L_simple on a tiny UNet, AdamW with warm-up, clipping and EMA; t and the
    noise come from a seeded generator (the recipes' way)."""
    diffusion = GaussianDiffusion.from_schedule("linear", 100)
    g = torch.Generator().manual_seed(0)

    def loss_fn(m, x0):
        return diffusion.training_losses(m, x0, generator=g)["loss"].mean()

    cfg = TrainConfig(steps=STEPS, lr=2e-3, warmup_steps=1, ema_decay=0.9, grad_clip=0.5)
    return train(_tiny_unet(dtype), loss_fn, batches(_data(dtype), batch_size, seed=3), cfg,
                 Profile("smoke", torch.device("cpu")), progress=progress)


def _train_conditional():
    """Classifier-free guidance's loss (chapter 06): labels dropped to the null class with a seeded
    generator, then L_simple; float64, global batch 8."""
    from diffusion_core.models.unet import UNet2D
    from diffusion_core.recipes.digits import unet_config
    from diffusion_core.recipes.guidance import digits_loss

    torch.manual_seed(0)
    model = UNet2D(unet_config(width=16, resolution=8, dropout=0.0, num_classes=11)).double()
    diffusion = GaussianDiffusion.from_schedule("linear", 100)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 10
    cfg = TrainConfig(steps=STEPS, lr=2e-3, warmup_steps=1, ema_decay=0.9)
    res = train(model, lambda m, b: digits_loss(m, diffusion, b[0], b[1], 0.5, 10, g),
                batches(_data(torch.float64), 8, 3, labels), cfg, Profile("smoke", torch.device("cpu")), progress=False)
    return _state(res)


class _WithUnused(torch.nn.Module):
    """A linear map and a parameter the loss never uses (its gradient stays None, in one process too)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 4)
        self.unused = torch.nn.Linear(4, 4)


def _train_with_unused():
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=3, weight_decay=0.1, warmup_steps=0, ema_decay=0.0)
    res = train(_WithUnused(), lambda m, b: m.a(b).square().mean(), batches(x, 8, seed=0), cfg,
                Profile("smoke", torch.device("cpu")), progress=False)
    return {"grad": res.model.unused.weight.grad, "state": res.model.state_dict()}


def _state(res) -> dict:
    return {"model": {k: v.detach().clone() for k, v in res.model.state_dict().items()},
            "ema": {k: v.detach().clone() for k, v in res.ema.state_dict().items()}, "losses": res.losses}


def _recipe():
    from diffusion_core.store import Recipe, register

    def config(p):
        return {"batch": 8, "seed": 0}

    def build(c):
        return _tiny_unet()

    def train_fn(model, c, p):
        res = _train_tiny(c["batch"])
        model.load_state_dict(res.ema.state_dict())
        return {"final_loss": res.losses[-1], "rank": D.rank()}

    return register(Recipe("test-ddp-tiny", 1, config, build, train_fn, "a tiny UNet for the distributed test"))


# ----------------------------------------------------------------------------- one process of two
def _worker(rank: int, port: int, out: str, cache: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DIFFUSION_CACHE=cache, OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from diffusion_core import store

    out_dir = Path(out)
    result = {}
    printed = io.StringIO()  # what this process prints: the bar (stderr) and the store's lines (stdout)
    # train() makes the process group itself from the torchrun-style environment
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        result["even"] = _state(_train_tiny(8, torch.float64, progress=True))
    result["world"] = D.world_size()
    result["uneven"] = _state(_train_tiny(7, torch.float64))      # 4 + 3 examples
    result["float32"] = _state(_train_tiny(8))
    result["unused"] = _train_with_unused()
    result["conditional"] = _train_conditional()
    # a batch stream that differs between processes is refused on every process
    try:
        train(_tiny_unet(), lambda m, x: m(x, torch.zeros(len(x))).square().mean(),
              iter([torch.full((4, 1, 8, 8), float(rank))]), TrainConfig(steps=1), Profile("smoke", torch.device("cpu")),
              progress=False)
        result["mismatch"] = None
    except ValueError as e:
        result["mismatch"] = str(e)
    # the store: every rank trains, only rank 0 writes, the others load its file
    saved = store.save

    def recording_save(model, path, metadata):
        with open(out_dir / "saves.log", "a") as f:
            f.write(f"{rank} {path.name}\n")
        saved(model, path, metadata)

    store.save = recording_save
    _recipe()
    profile = Profile("smoke", torch.device("cpu"))
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        first = store.load("test-ddp-tiny", profile)
        second = store.load("test-ddp-tiny", profile)
    result["printed"] = printed.getvalue()
    result["store"] = {"first_trained": first.trained_now, "second_trained": second.trained_now,
                       "metrics": first.metrics, "second_metrics": second.metrics,
                       "weights": {k: v.clone() for k, v in first.model.state_dict().items()}}
    torch.save(result, out_dir / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Run :func:`_worker` on two gloo processes (killed after ``TIMEOUT_S``); their results by rank."""
    out = tmp_path_factory.mktemp("ddp")
    cache = out / "cache"
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out), str(cache)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the two training processes did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return results, out, cache


def _assert_close(a: dict, b: dict, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


# ----------------------------------------------------------------------------- the tests
# In float64 the two runs differ only in the order of sums (a slice's mean, then DDP's average), so
# the weights agree to about 1e-13: the same training, exactly. In float32 the same rounding, about
# 1e-7 of a gradient, is enlarged by Adam, which divides each gradient by its own size: an element
# whose gradient is near zero moves by up to a learning rate in either direction in both runs.
def test_two_processes_equal_one_process_at_the_same_global_batch(two_processes):
    results, _, _ = two_processes
    ref = _state(_train_tiny(8, torch.float64))
    assert results[0]["world"] == WORLD
    for r in results:
        _assert_close(r["even"]["model"], ref["model"], rtol=1e-9, atol=1e-12)
        _assert_close(r["even"]["ema"], ref["ema"], rtol=1e-9, atol=1e-12)
        assert r["even"]["losses"] == pytest.approx(ref["losses"], rel=1e-12)
    # the processes trained, and not a no-op: the weights moved
    start = _tiny_unet(torch.float64).state_dict()
    assert max((ref["model"][k] - start[k]).abs().max().item() for k in start) > 1e-3


def test_uneven_shards_still_equal_one_process(two_processes):
    results, _, _ = two_processes
    ref = _state(_train_tiny(7, torch.float64))
    for r in results:
        _assert_close(r["uneven"]["model"], ref["model"], rtol=1e-9, atol=1e-12)
        _assert_close(r["uneven"]["ema"], ref["ema"], rtol=1e-9, atol=1e-12)
        assert r["uneven"]["losses"] == pytest.approx(ref["losses"], rel=1e-12)


def test_condition_dropout_is_sliced_from_the_global_draw_too(two_processes):
    results, _, _ = two_processes
    ref = _train_conditional()
    for r in results:
        _assert_close(r["conditional"]["model"], ref["model"], rtol=1e-9, atol=1e-12)
        assert r["conditional"]["losses"] == pytest.approx(ref["losses"], rel=1e-12)


def test_float32_training_equals_one_process_up_to_rounding(two_processes):
    results, _, _ = two_processes
    ref = _state(_train_tiny(8))
    lr = 2e-3
    for r in results:
        assert r["float32"]["losses"] == pytest.approx(ref["losses"], rel=1e-6)
        for part in ("model", "ema"):
            # within 2% of one step's size (measured: 0.35%)
            _assert_close(r["float32"][part], ref[part], rtol=0, atol=0.02 * lr)


def test_a_parameter_the_loss_never_uses_is_left_alone_as_in_one_process(two_processes):
    results, _, _ = two_processes
    ref = _train_with_unused()
    assert ref["grad"] is None
    for r in results:
        assert r["unused"]["grad"] is None           # not a zero gradient: weight decay leaves it alone
        _assert_close(r["unused"]["state"], ref["state"])


def test_processes_are_bitwise_in_step(two_processes):
    results, _, _ = two_processes
    for case in ("even", "uneven", "float32"):
        for part in ("model", "ema"):
            a, b = results[0][case][part], results[1][case][part]
            assert all(torch.equal(a[k], b[k]) for k in a), (case, part)


def test_only_rank_0_prints_the_bar_and_the_stores_lines(two_processes):
    results, _, _ = two_processes
    assert "training:" in results[0]["printed"] and "/4 [" in results[0]["printed"]   # the bar
    assert "[store] test-ddp-tiny (smoke): training" in results[0]["printed"]
    assert "[store] test-ddp-tiny (smoke): loaded" in results[0]["printed"]
    assert results[1]["printed"] == ""


def test_different_batches_on_different_processes_are_an_error(two_processes):
    results, _, _ = two_processes
    for r in results:
        assert r["mismatch"] is not None and "different global batches" in r["mismatch"]


def test_only_rank_0_writes_to_the_store_and_every_rank_loads_its_file(two_processes):
    results, out, cache = two_processes
    saves = (out / "saves.log").read_text().split()
    assert saves[0::2] == ["0"], saves                            # one write, by rank 0
    assert len(list(cache.glob("test-ddp-tiny-*.safetensors"))) == 1
    assert not list(cache.glob("*.tmp"))
    ref = _train_tiny(8)
    for r in results:
        s = r["store"]
        assert s["first_trained"] and not s["second_trained"]     # then found in the cache
        assert s["metrics"]["rank"] == 0 and s["second_metrics"]["rank"] == 0  # rank 0's metrics, everywhere
        assert s["metrics"]["final_loss"] == pytest.approx(ref.losses[-1], rel=1e-6)
        _assert_close(s["weights"], ref.ema.state_dict(), rtol=0, atol=0.02 * 2e-3)  # float32, as above
    assert all(torch.equal(results[0]["store"]["weights"][k], results[1]["store"]["weights"][k])
               for k in results[0]["store"]["weights"])


# ----------------------------------------------------------------------------- one process
def test_shard_bounds_cover_the_batch_in_rank_order():
    for total, world in [(8, 2), (7, 2), (10, 4), (3, 3)]:
        bounds = [D.shard_bounds(total, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="cannot be shared by 4 processes"):
        D.shard_bounds(3, 0, 4)


def test_batch_draws_are_torch_draws_outside_a_sharded_step():
    def g():
        return torch.Generator().manual_seed(5)
    assert torch.equal(D.batch_randn((6, 3), generator=g()), torch.randn(6, 3, generator=g()))
    assert torch.equal(D.batch_rand((6,), generator=g()), torch.rand(6, generator=g()))
    assert torch.equal(D.batch_randint(0, 10, (6,), generator=g()), torch.randint(0, 10, (6,), generator=g()))


def test_a_sharded_draw_is_the_processs_rows_of_the_global_draw():
    def g():
        return torch.Generator().manual_seed(5)
    whole = torch.randn(7, 2, generator=g())
    t_whole = torch.randint(0, 100, (7,), generator=g())
    for rank in range(2):
        shard = D.Shard(*D.shard_bounds(7, rank, 2), 7)
        with D.sharded(shard):
            assert torch.equal(D.batch_randn((shard.size, 2), generator=g()), whole[shard.start:shard.stop])
            assert torch.equal(GaussianDiffusion.from_schedule("linear", 100).sample_t(shard.size, generator=g()),
                               t_whole[shard.start:shard.stop])
            with pytest.raises(ValueError, match="first dimension"):
                D.batch_randn((shard.size + 1, 2), generator=g())


def test_shard_batch_slices_every_tensor_and_keeps_other_values():
    batch = {"x": torch.arange(10).reshape(5, 2), "pair": (torch.arange(5), "caption")}
    part = D.shard_batch(batch, D.Shard(3, 5, 5))
    assert torch.equal(part["x"], batch["x"][3:5]) and torch.equal(part["pair"][0], torch.arange(3, 5))
    assert part["pair"][1] == "caption"
    assert D.batch_size(batch) == 5
    with pytest.raises(ValueError, match="same first dimension"):
        D.batch_size((torch.zeros(4, 2), torch.zeros(3)))


def test_without_torchrun_nothing_is_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init("cpu") is False and D.world_size() == 1 and D.is_main()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        D.init("cpu")
    assert json.dumps(D.run_on_main(lambda: {"a": 1})) == '{"a": 1}'


def test_store_command_lists_recipes_and_refuses_unknown_names(capsys):
    from diffusion_core import store

    assert store.main(["--list"]) == 0
    assert "digits-ddpm" in capsys.readouterr().out.split()
    with pytest.raises(SystemExit) as e:
        store.main(["no-such-recipe"])
    assert e.value.code == 2 and "unknown recipe(s) no-such-recipe" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:   # refused by the parser, before any training
        store.main(["digits-ddpm", "--profile", "bogus"])
    assert e.value.code == 2 and "argument --profile: invalid choice: 'bogus'" in capsys.readouterr().err
