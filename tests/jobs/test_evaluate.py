"""`selfsup evaluate` and `selfsup runs show` on a real (tiny) pretraining run over Fashion-MNIST shards."""
from __future__ import annotations

import shutil

import pytest

from selfsup.jobs.cli import main
from selfsup.jobs.evaluation.results import read_results
from selfsup.pipeline import storage
from tests.conftest import FMNIST, ROOT, read_tb_scalars, run_cli
from selfsup.trainers import checkpoint as ck
from selfsup.trainers import run_folder as rf

CONFIG = str(ROOT / "jobs" / "configs" / "simclr_image.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """FMNIST shards (pretrain 400, probe-train 300, probe-test 200) and a 4-step run with 2 checkpoints."""
    root = tmp_path_factory.mktemp("eval")
    data = str(root / "fm")
    for split, extra in (("pretrain", ["--limit", "400"]), ("probe-train", ["--limit", "300"]),
                         ("probe-test", ["--subset", "test", "--limit", "200"])):
        res = run_cli("shards", "write", str(FMNIST), data, "--modality", "image", "--split", split,
                      "--samples-per-shard", "100", "--workers", "1", "--quiet", *extra)
        assert res.returncode == 0, res.stderr
    run = str(root / "run")
    assert main(["pretrain", CONFIG, f"run={run}", f"data.sources=[{{url: {data}}}]", "train.steps=4",
                 "train.ckpt_every=2", "train.log_every=1", "data.batch_size=32", "data.backend=inline",
                 "objective.backbone_args.width=8", "--no-ray", "--quiet"]) == 0
    return run, data


def rows(run):
    return read_results(run).to_pylist()


def test_watch_evaluates_each_checkpoint_once_across_a_restart(trained, capsys):
    run, data = trained
    common = ["--eval-set", f"fm={data}", "--no-ray", "--quiet", "--methods", "knn,linear"]
    step2, step4 = (u for _, u in ck.list_checkpoints(run))
    assert main(["evaluate", step2, *common]) == 0
    first = rows(run)
    assert {(r["encoder"], r["method"]) for r in first} == {(e, m) for e in ("pretrained", "random_init", "raw")
                                                           for m in ("knn", "linear")}
    assert all(r["n_test"] == 200 and r["n_train"] == 300 for r in first)  # every probe sample once
    # a watcher that died after storing step 4's rows but before its marker
    assert main(["evaluate", step4, *common]) == 0
    storage.delete(storage.join(step4, ck.EVALUATED))
    n = len(rows(run))
    assert n == 8  # step 4 adds only its pretrained rows: baselines are cached per architecture
    assert main(["evaluate", run, "--watch", "--poll", "0.1", *common]) == 0  # run finished → one pass, exit
    after = rows(run)
    assert len(after) == n
    keys = [(r["checkpoint"], r["encoder"], r["method"]) for r in after]
    assert len(keys) == len(set(keys))
    assert ck.is_evaluated(step4)
    out = capsys.readouterr().out
    assert "pretrained" in out and "random init" in out and "raw" in out
    assert storage.exists(storage.join(run, "eval", "accuracy.png"))
    tb = read_tb_scalars(rf.tb_url(run))  # accuracies beside the training curves, by checkpoint step
    assert [s for s, _ in tb["eval/fm/cls/knn/pretrained"]] == [2, 4] and "train/loss" in tb
    assert tb["eval/fm/cls/linear/raw"] == [(2, pytest.approx(next(
        r["accuracy"] for r in first if (r["encoder"], r["method"]) == ("raw", "linear"))))]
    assert storage.exists(storage.join(run, "eval", "loss.png"))
    assert main(["runs", "show", run]) == 0
    shown = capsys.readouterr().out
    assert "finished at step 4/4" in shown and "step-000004*" in shown


@pytest.mark.e2e
def test_ray_actors_give_the_same_accuracy(trained, ray_cluster, tmp_path):
    run, data = trained
    args = ["--eval-set", f"fm={data}", "--quiet", "--methods", "knn", "--no-baselines"]
    copies = {}
    for name, extra in (("ray", ["--workers", "2", "--worker-cpus", "0.5"]), ("local", ["--no-ray"])):
        copies[name] = tmp_path / name
        shutil.copytree(run, copies[name], ignore=shutil.ignore_patterns("eval", ck.EVALUATED))
        assert main(["evaluate", str(copies[name]), *args, *extra]) == 0
    # the same checkpoint again: its rows exist, nothing is redone
    assert main(["evaluate", str(copies["ray"]), *args, "--no-ray"]) == 0
    ray_rows, local_rows = rows(str(copies["ray"])), rows(str(copies["local"]))
    assert len(ray_rows) == 1 and len(local_rows) == 1
    assert ray_rows[0]["n_test"] == local_rows[0]["n_test"] == 200
    assert ray_rows[0]["accuracy"] == pytest.approx(local_rows[0]["accuracy"], abs=1e-9)


def test_bad_checkpoints_get_a_clear_error(trained, tmp_path, capsys):
    run, data = trained
    step4 = ck.list_checkpoints(run)[-1][1]
    partial = tmp_path / "partial" / "checkpoints" / "step-000004"
    shutil.copytree(step4, partial)
    (partial / ck.META).unlink()
    corrupt = tmp_path / "corrupt" / "checkpoints" / "step-000004"
    shutil.copytree(step4, corrupt)
    (corrupt / ck.ENCODER).write_bytes(b"not a torch file")
    args = ["--eval-set", f"fm={data}", "--no-ray", "--quiet", "--no-baselines"]
    for path, message in ((tmp_path / "missing", "neither a complete checkpoint"),
                          (partial, "neither a complete checkpoint"),
                          (corrupt, "encoder.pt is not a readable checkpoint file")):
        assert main(["evaluate", str(path), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and str(path.name) in err, err
    assert main(["evaluate", run, "--eval-set", "nonsense", "--no-ray"]) == 2
    assert "NAME=TRAIN_URL" in capsys.readouterr().err
