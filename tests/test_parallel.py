"""Data-parallel training (issue 7): ``mpirun -np 2 minicaffe train`` against one process.

Caffe's sharding makes the comparison exact: worker ``r`` of 2 reads the records ``i % 2 == r``, so at
iteration ``k`` the two workers with batch ``B`` together read records ``2kB .. 2kB + 2B - 1``, the
very records one process with batch ``2B`` reads at that iteration. The gradient of each worker is
the mean over its ``B`` records; the all-reduce sums and halves them, which is the mean over ``2B``.
So the weights must agree up to float32 rounding.

The database holds ``2 * B * SNAPSHOT`` records: a snapshot falls on an epoch boundary, so a resumed
run (whose Data layer starts again from the first record, as Caffe's does) reads what the
uninterrupted run would have read, and resuming can be compared with not stopping at all.

The mpirun cases skip where ``mpirun`` or mpi4py is missing (``.ci/run`` installs Open MPI from the
system packages where it can); the NCCL case skips without CuPy, a GPU and NCCL.
"""
import importlib.util
import os
import shutil
import subprocess
import sys

import lmdb
import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.core import backend
from minicaffe.parallel import data_parallel as parallel
from minicaffe.data import LMDBSource, array_to_datum, set_solver_rank, solver_count, solver_rank
from minicaffe.errors import MinicaffeError, SolverError
from minicaffe.proto import caffe_pb2

B = 4                          # batch per worker
ITERS = 4
SNAPSHOT = 2
RECORDS = 2 * B * SNAPSHOT
SIDE = 12
TIMEOUT_S = 120


# --- files ----------------------------------------------------------------------------------------

def write_lmdb(path, n, seed=0):
    """``n`` distinct 1x12x12 images; the label of record i is i % 3."""
    rng = np.random.default_rng(seed)
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(n):
            img = rng.integers(0, 256, (1, SIDE, SIDE), dtype=np.uint8)
            txn.put(b"%08d" % i, array_to_datum(img, i % 3).SerializeToString())
    env.close()
    return str(path)


NET = """name: "tiny"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.00390625 }} data_param {{ source: "{source}" batch_size: {batch} backend: LMDB }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 4 kernel_size: 3 weight_filler {{ type: "xavier" }}
                       bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  inner_product_param {{ num_output: 8 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""


def write_solver(path, net, prefix, extra=""):
    with open(path, "w") as f:
        f.write(f'net: "{net}"\nbase_lr: 0.1\nmomentum: 0.9\nweight_decay: 0.0005\nlr_policy: "fixed"\n'
                f'display: 1\nmax_iter: {ITERS}\nsnapshot: {SNAPSHOT}\nsnapshot_prefix: "{prefix}"\n'
                f'random_seed: 7\nsolver_mode: CPU\n{extra}')
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The database and a net per batch size, in one directory."""
    root = tmp_path_factory.mktemp("parallel")
    source = write_lmdb(root / "train_lmdb", RECORDS)
    nets = {}
    for batch in (2, B, 2 * B):
        nets[batch] = str(root / f"net_batch{batch}.prototxt")
        with open(nets[batch], "w") as f:
            f.write(NET.format(source=source, batch=batch))
    return root, nets


def weights(path):
    """{(layer, k): array} of a .caffemodel."""
    net = caffe_pb2.NetParameter()
    with open(path, "rb") as f:
        net.ParseFromString(f.read())
    return {(lp.name, k): np.asarray(b.data, np.float64) for lp in net.layer for k, b in enumerate(lp.blobs)}


def history(path):
    state = caffe_pb2.SolverState()
    with open(path, "rb") as f:
        state.ParseFromString(f.read())
    return state.iter, [np.asarray(h.data, np.float64) for h in state.history]


def assert_same_weights(path_a, path_b, atol=1e-5):
    a, b = weights(path_a), weights(path_b)
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.isfinite(a[key]).all(), f"{key} of {path_a} is not finite"
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=atol, err_msg=f"{key} of {path_a} vs {path_b}")


def train_here(solver_path, resume=None):
    """One process, in this one (rank 0 of 1)."""
    solver = caffe.get_solver(solver_path)
    solver.solve(resume)
    return solver


# --- mpirun ---------------------------------------------------------------------------------------

def mpi_env(**extra):
    env = dict(os.environ)
    env.update({
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
        # containers often forbid the cross-memory-attach single copy: Open MPI warns, then copies twice
        "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    })
    env.update(extra)
    return env


def mpirun_prefix():
    cmd = ["mpirun", "--oversubscribe", "--bind-to", "none"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd


TRAIN = [sys.executable, "-m", "minicaffe.tools.cli", "train"]


def mpirun(args, cwd, env=None, check=True):
    result = subprocess.run(mpirun_prefix() + args, cwd=cwd, env=env or mpi_env(), capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    if check and result.returncode != 0:
        raise AssertionError(f"mpirun exited with {result.returncode}:\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def mpi(tmp_path_factory):
    """Skip unless ``mpirun -np 2`` can start two mpi4py processes that talk to each other."""
    if shutil.which("mpirun") is None:
        pytest.skip("no mpirun (Debian: apt-get install openmpi-bin libopenmpi-dev)")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("no mpi4py (pip install minicaffe[mpi])")
    probe = "from mpi4py import MPI; c = MPI.COMM_WORLD; assert c.allreduce(1) == c.Get_size() == 2"
    try:
        result = mpirun(["-np", "2", sys.executable, "-c", probe], cwd=str(tmp_path_factory.getbasetemp()),
                        check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("mpirun -np 2 did not finish a two-process probe in time")
    if result.returncode != 0:
        pytest.skip(f"mpirun -np 2 cannot run mpi4py here: {result.stderr.strip()[-500:]}")


@pytest.fixture(scope="module")
def reference(world):
    """One process, batch 2B: snapshots at SNAPSHOT and ITERS."""
    root, nets = world
    (root / "ref").mkdir()
    train_here(write_solver(root / "ref.prototxt", nets[2 * B], root / "ref" / "tiny"))
    return {it: (str(root / "ref" / f"tiny_iter_{it}.caffemodel"), str(root / "ref" / f"tiny_iter_{it}.solverstate"))
            for it in (SNAPSHOT, ITERS)}


@pytest.fixture(scope="module")
def two_workers(mpi, world):
    """``mpirun -np 2 minicaffe train``, batch B per worker: snapshots at SNAPSHOT and ITERS."""
    root, nets = world
    (root / "mpi").mkdir()
    solver = write_solver(root / "mpi.prototxt", nets[B], root / "mpi" / "tiny")
    result = mpirun(["-np", "2"] + TRAIN + ["--solver", solver], cwd=str(root))
    return result, {it: (str(root / "mpi" / f"tiny_iter_{it}.caffemodel"),
                         str(root / "mpi" / f"tiny_iter_{it}.solverstate")) for it in (SNAPSHOT, ITERS)}


def test_two_mpi_workers_train_the_weights_of_one_process_with_twice_the_batch(two_workers, reference):
    result, snaps = two_workers
    assert "Worker 0 of 2 (mpi)" in result.stderr
    for it in (SNAPSHOT, ITERS):
        assert_same_weights(snaps[it][0], reference[it][0])
        it_mpi, hist_mpi = history(snaps[it][1])
        it_ref, hist_ref = history(reference[it][1])
        assert len(hist_ref) == 6               # SGD keeps one momentum blob per parameter
        assert it_mpi == it_ref == it
        for h_mpi, h_ref in zip(hist_mpi, hist_ref, strict=True):        # the momentum agrees too
            np.testing.assert_allclose(h_mpi, h_ref, rtol=0, atol=1e-5)
    # training moved the weights: agreeing is not the trivial agreement of two untouched nets
    before, after = weights(reference[SNAPSHOT][0]), weights(reference[ITERS][0])
    assert max(np.abs(before[k] - after[k]).max() for k in before) > 1e-3


def test_lenet_of_models_on_two_workers_with_root_testing(mpi, tmp_path):
    """The shipped LeNet (its Data layers pointed at a small 28x28 LMDB), with test passes on rank 0:
    2 workers x batch 8 end where 1 process x batch 16 does."""
    from minicaffe.formats.prototxt import load_net_param
    rng = np.random.default_rng(1)
    env = lmdb.open(str(tmp_path / "digits"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(32):
            img = rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)
            txn.put(b"%08d" % i, array_to_datum(img, i % 10).SerializeToString())
    env.close()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    solvers = {}
    for workers, batch in ((1, 16), (2, 8)):
        param = load_net_param(os.path.join(root, "models", "lenet", "train_val.prototxt"))
        for lp in param.layer:
            if lp.type == "Data":
                lp.data_param.source, lp.data_param.batch_size = str(tmp_path / "digits"), batch
        net = tmp_path / f"lenet{workers}.prototxt"
        net.write_text(str(param))
        (tmp_path / f"out{workers}").mkdir()
        solvers[workers] = write_solver(tmp_path / f"solver{workers}.prototxt", net,
                                        tmp_path / f"out{workers}" / "lenet", "test_iter: 1\ntest_interval: 2\n")
    train_here(solvers[1])
    result = mpirun(["-np", "2"] + TRAIN + ["--solver", solvers[2]], cwd=str(tmp_path))
    assert "Testing net (#0)" in result.stderr
    assert_same_weights(tmp_path / "out2" / f"lenet_iter_{ITERS}.caffemodel",
                        tmp_path / "out1" / f"lenet_iter_{ITERS}.caffemodel")


@pytest.mark.parametrize("case", ["bucket per parameter", "reduce after backward", "iter_size 2"])
def test_bucketing_overlap_and_iter_size_do_not_change_the_result(mpi, world, reference, case):
    root, nets = world
    net, extra, env = nets[B], "", mpi_env()
    if case == "bucket per parameter":       # six all-reduces, each started after its layer's backward
        env = mpi_env(**{parallel.BUCKET_VAR: "1e-6"})
    elif case == "reduce after backward":
        extra = "layer_wise_reduce: false\n"
    else:                                    # 2 passes of 2 per worker: the same 8 records an iteration
        net, extra = nets[2], "iter_size: 2\n"
    out = root / case.replace(" ", "_")
    out.mkdir()
    solver = write_solver(root / f"{out.name}.prototxt", net, out / "tiny", extra)
    mpirun(["-np", "2"] + TRAIN + ["--solver", solver], cwd=str(root), env=env)
    assert_same_weights(out / f"tiny_iter_{ITERS}.caffemodel", reference[ITERS][0])


def test_only_rank_0_writes_snapshots(mpi, world):
    """Each rank runs in a directory of its own, with a relative snapshot prefix: rank 1's stays empty
    (and need not even have the snapshot directory)."""
    root, nets = world
    rank0, rank1 = root / "rank0", root / "rank1"
    (rank0 / "snaps").mkdir(parents=True)
    rank1.mkdir()
    solver = write_solver(root / "relative.prototxt", nets[B], "snaps/tiny")
    worker = TRAIN + ["--solver", solver]
    mpirun(["-np", "1", "--wdir", str(rank0)] + worker + [":", "-np", "1", "--wdir", str(rank1)] + worker,
           cwd=str(root))
    written = sorted(p.name for p in (rank0 / "snaps").iterdir())
    assert written == sorted(f"tiny_iter_{it}{ext}" for it in (SNAPSHOT, ITERS)
                             for ext in (".caffemodel", ".solverstate", ".solverstate.rng"))
    assert list(rank1.iterdir()) == []


def test_a_two_worker_snapshot_resumes_on_one_worker(two_workers, world, reference):
    root, nets = world
    (root / "resumed1").mkdir()
    solver = write_solver(root / "resumed1.prototxt", nets[2 * B], root / "resumed1" / "tiny")
    resumed = train_here(solver, resume=two_workers[1][SNAPSHOT][1])
    assert resumed.iter == ITERS
    assert_same_weights(root / "resumed1" / f"tiny_iter_{ITERS}.caffemodel", reference[ITERS][0])


def test_a_one_worker_snapshot_resumes_on_two_workers(mpi, world, reference):
    root, nets = world
    (root / "resumed2").mkdir()
    solver = write_solver(root / "resumed2.prototxt", nets[B], root / "resumed2" / "tiny")
    result = mpirun(["-np", "2"] + TRAIN + ["--solver", solver, "--snapshot", reference[SNAPSHOT][1]], cwd=str(root))
    assert "Resuming from" in result.stderr
    assert not (root / "resumed2" / f"tiny_iter_{SNAPSHOT}.caffemodel").exists()   # it started after it
    assert_same_weights(root / "resumed2" / f"tiny_iter_{ITERS}.caffemodel", reference[ITERS][0])


def test_an_error_on_one_worker_ends_the_whole_job(mpi, world):
    root, nets = world
    solver = write_solver(root / "broken.prototxt", nets[B], root / "tiny")
    result = mpirun(["-np", "2"] + TRAIN + ["--solver", solver, "--snapshot", str(root / "missing.solverstate")],
                    cwd=str(root), check=False)
    assert result.returncode != 0
    assert "error: [worker 0 of 2]" in result.stderr
    assert "missing.solverstate: no such solver state file" in result.stderr


# --- workers started with different solvers or nets (issue 11, item 11) ---------------------------

def _solver_text(path):
    with open(path) as f:
        return f.read()


@pytest.mark.parametrize("case", ["base_lr", "max_iter", "net"])
def test_workers_with_different_solvers_or_nets_stop_together_naming_the_field(mpi, world, tmp_path, case):
    """Rank 1 reads another solver file. Before the set-up check a different base_lr trained different
    weights without a word (exit 0), a different max_iter left rank 0 waiting forever in an all-reduce,
    and a different net died in MPI_ERR_TRUNCATE at the first broadcast. Now both ranks exit 1 after
    one line naming the field and both values, and neither is killed by an abort."""
    _, nets = world
    solver0 = write_solver(tmp_path / "solver0.prototxt", nets[B], tmp_path / "tiny")
    text = _solver_text(solver0)
    expected = {"base_lr": "rank 1 has base_lr: 0.2, rank 0 has base_lr: 0.1",
                "max_iter": f"rank 1 has max_iter: {ITERS + 2}, rank 0 has max_iter: {ITERS}",
                "net": 'rank 1 has net layer["ip1"].inner_product_param.num_output: 16, '
                       'rank 0 has net layer["ip1"].inner_product_param.num_output: 8'}[case]
    if case == "base_lr":
        text = text.replace("base_lr: 0.1", "base_lr: 0.2")
    elif case == "max_iter":
        text = text.replace(f"max_iter: {ITERS}", f"max_iter: {ITERS + 2}")
    else:
        other = tmp_path / "wider.prototxt"
        other.write_text(_solver_text(nets[B]).replace("num_output: 8", "num_output: 16"))
        text = text.replace(nets[B], str(other))
    (tmp_path / "solver1.prototxt").write_text(text)
    assert text != _solver_text(solver0)
    ranks = []
    for r in (0, 1):           # each rank records its own exit status (mpirun reports only one)
        cmd = " ".join(TRAIN + ["--solver", str(tmp_path / f"solver{r}.prototxt")])
        ranks += [":", "-np", "1", "sh", "-c", f"{cmd}; echo $? > {tmp_path / f'rc{r}'}"]
    result = mpirun(ranks[1:], cwd=str(tmp_path), check=False)
    codes = [(tmp_path / f"rc{r}").read_text().strip() if (tmp_path / f"rc{r}").exists() else None for r in (0, 1)]
    assert codes == ["1", "1"], result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: the workers were started with different solver "
                                                     "or net definitions"), result.stderr[-3000:]
    assert expected in errors[0] and "solver1.prototxt" in errors[0]
    assert "MPI_ERR" not in result.stderr and "MPI_ABORT" not in result.stderr
    assert not (tmp_path / f"tiny_iter_{SNAPSHOT}.caffemodel").exists()      # no training step was taken


ALLGATHER_PROBE = """
from minicaffe.parallel import data_parallel as parallel
comm = parallel.MPIComm()
for payload in ([b"rank 0 set-up", b"x" * 1000], [b"", b"\\x00\\xff"]):
    mine = payload[comm.rank]
    assert comm.allgather_bytes(mine) == payload
    assert parallel.Communicator.allgather_bytes(comm, mine) == payload     # the broadcast-built one
print("gathered on rank", comm.rank)
"""


def test_allgather_bytes_of_mpi_and_of_broadcasts_agree(mpi, tmp_path):
    """The set-up check's exchange: MPI's own allgather and the one built from broadcasts (what NCCL
    workers use) give every rank every payload, in rank order, empty ones included."""
    result = mpirun(["-np", "2", sys.executable, "-c", ALLGATHER_PROBE], cwd=str(tmp_path))
    assert result.stdout.count("gathered on rank") == 2
    assert parallel.LocalComm().allgather_bytes(b"alone") == [b"alone"]


def _description(solver_path):
    return parallel.setup_description(caffe.get_solver(solver_path))


def test_setup_check_compares_effective_values_and_shapes(world, tmp_path, monkeypatch):
    """The field-by-field comparison behind the set-up check, in one process: equal descriptions and
    explicit defaults pass; the net's file name does not count (its contents do); a blob shape that
    differs while the definitions agree (the images differ) is named."""
    _, nets = world
    base = write_solver(tmp_path / "base.prototxt", nets[B], tmp_path / "tiny")
    a = _description(base)
    assert parallel.setup_differences([a, a]) == ""
    explicit = tmp_path / "explicit.prototxt"             # iter_size 1 and device_id 3 change nothing
    explicit.write_text(_solver_text(base) + "iter_size: 1\ndevice_id: 3\n")
    copy = tmp_path / "same_net.prototxt"                 # the same net under another name
    copy.write_text(_solver_text(nets[B]))
    moved = tmp_path / "moved.prototxt"
    moved.write_text(_solver_text(base).replace(nets[B], str(copy)))
    for path in (explicit, moved):
        assert parallel.setup_differences([a, _description(str(path))]) == ""
    lr = tmp_path / "lr.prototxt"
    lr.write_text(_solver_text(base).replace("base_lr: 0.1", "base_lr: 0.02").replace('"fixed"', '"inv"')
                  + "gamma: 0.1\npower: 0.75\n")
    message = parallel.setup_differences([a, _description(str(lr)), a])
    assert "rank 1 has base_lr: 0.02, rank 0 has base_lr: 0.1" in message
    assert 'rank 1 has lr_policy: "inv", rank 0 has lr_policy: "fixed"' in message
    assert "rank 2" not in message
    # the same definitions with a relative source: another directory holds 16x16 images, not 12x12
    for side, where in ((SIDE, tmp_path / "small"), (16, tmp_path / "large")):
        where.mkdir()
        env = lmdb.open(str(where / "train_lmdb"), map_size=1 << 24)
        with env.begin(write=True) as txn:
            for i in range(B):
                txn.put(b"%08d" % i, array_to_datum(np.zeros((1, side, side), np.uint8), 0).SerializeToString())
        env.close()
    net = tmp_path / "relative_net.prototxt"
    net.write_text(NET.format(source="train_lmdb", batch=B))
    relative = write_solver(tmp_path / "relative.prototxt", net, tmp_path / "tiny")
    found = []
    for where in ("small", "large"):
        with monkeypatch.context() as m:
            m.chdir(tmp_path / where)
            found.append(_description(relative))
    message = parallel.setup_differences(found)
    assert 'rank 1 has net layer["ip1"] blob 0 shape: (8, 196), rank 0 has net layer["ip1"] blob 0 shape: (8, 100)' \
        in message


# --- sharding --------------------------------------------------------------------------------------

@pytest.fixture
def solver_rank_reset():
    yield
    set_solver_rank(0, 1)
    parallel.set_multiprocess(False)


def labels_of(items):
    return [int(key) for key, _ in items]


def test_lmdb_shards_are_disjoint_cover_the_database_and_wrap_on(tmp_path):
    path = write_lmdb(tmp_path / "db", 10)
    seen = []
    for rank in range(3):
        with LMDBSource(path, rank, 3) as source:
            stream = labels_of(source.next() for _ in range(6))
        # stream position p = rank + 3j holds record p % 10, across the wrap at the end
        assert stream == [(rank + 3 * j) % 10 for j in range(6)]
        seen += [k for k in stream[:len(range(rank, 10, 3))]]
    assert sorted(seen) == list(range(10))          # one epoch of all workers: every record once


def test_lmdb_shard_rank_out_of_range_is_refused(tmp_path):
    path = write_lmdb(tmp_path / "db", 2)
    with pytest.raises(MinicaffeError, match=r"shard rank 2 is not in \[0, 2\)"):
        LMDBSource(path, 2, 2)


def test_data_layer_reads_its_shard_at_train_and_everything_at_test(tmp_path, solver_rank_reset):
    path = write_lmdb(tmp_path / "db", 8)
    net_file = tmp_path / "data.prototxt"
    net_file.write_text(f'layer {{ name: "d" type: "Data" top: "data" top: "label" '
                        f'data_param {{ source: "{path}" batch_size: 4 backend: LMDB }} }}\n')
    set_solver_rank(1, 2)
    assert (solver_rank(), solver_count()) == (1, 2)
    train = caffe.Net(str(net_file), caffe.TRAIN)
    train.forward()
    assert train.blobs["label"].data.tolist() == [1 % 3, 3 % 3, 5 % 3, 7 % 3]
    first = train.blobs["data"].data.copy()
    test = caffe.Net(str(net_file), caffe.TEST)
    test.forward()
    assert test.blobs["label"].data.tolist() == [0, 1, 2, 0]
    np.testing.assert_array_equal(first[0], test.blobs["data"].data[1])     # record 1 is rank 1's first


# --- in one process ---------------------------------------------------------------------------------

class RankOneOfTwo(parallel.LocalComm):
    """Worker 1 of 2 whose partner never says anything different (reductions halve, broadcasts keep)."""
    rank, size = 1, 2


def test_local_comm_parallel_solver_trains_as_the_plain_solver(world):
    """The single-process path of the wrapper (one bucket per parameter, overlapped) changes nothing."""
    root, nets = world
    plain = caffe.get_solver(write_solver(root / "plain.prototxt", nets[B], root / "plain"))
    plain.step(ITERS)
    wrapped = parallel.ParallelSolver(caffe.get_solver(write_solver(root / "local.prototxt", nets[B], root / "local")),
                                      parallel.LocalComm(), bucket_mb=1e-6)
    assert len(wrapped.reducer.buckets) == len(wrapped.net.learnable_params) == 6
    wrapped.step(ITERS)
    assert wrapped.iter == ITERS
    for p, q in zip(plain.net.learnable_params, wrapped.net.learnable_params):
        np.testing.assert_array_equal(p.data, q.data)
    assert 0.0 <= wrapped.communication_share() < 1.0
    assert wrapped.reducer.nbytes == 4 * sum(p.count for p in plain.net.learnable_params)


def test_a_worker_of_rank_1_writes_no_snapshot_and_builds_no_test_net(world, solver_rank_reset, tmp_path):
    root, nets = world
    comm = parallel.setup_worker(RankOneOfTwo(), quiet_workers=False)
    solver = parallel.ParallelSolver(caffe.get_solver(write_solver(tmp_path / "s.prototxt", nets[B], tmp_path / "w")),
                                     comm)
    assert not solver.is_root and solver.test_nets == []
    solver.step(1)
    model, state = solver.snapshot()
    assert model.endswith("w_iter_1.caffemodel") and not os.path.exists(model) and not os.path.exists(state)
    assert list(tmp_path.iterdir()) == [tmp_path / "s.prototxt"]


def test_parallel_solver_refuses_a_solver_built_for_another_world(world):
    root, nets = world
    solver = caffe.get_solver(write_solver(root / "other.prototxt", nets[B], root / "other"))
    with pytest.raises(SolverError, match="setup_worker"):
        parallel.ParallelSolver(solver, RankOneOfTwo())
    wrapped = parallel.ParallelSolver(solver, parallel.LocalComm())
    with pytest.raises(SolverError, match="already"):
        parallel.ParallelSolver(solver, parallel.LocalComm())
    with pytest.raises(SolverError, match="already"):
        parallel.ParallelSolver(wrapped, parallel.LocalComm())


def test_bucket_size_must_be_positive(env_switch, world):
    root, nets = world
    solver = caffe.get_solver(write_solver(root / "bucket.prototxt", nets[B], root / "bucket"))
    env_switch(parallel.BUCKET_VAR, "lots")
    with pytest.raises(MinicaffeError, match="MINICAFFE_BUCKET_MB.*'lots'"):
        parallel.ParallelSolver(solver, parallel.LocalComm())


def test_launch_environment_is_read_without_starting_mpi():
    assert parallel.mpi_world_size({}) == 1
    assert parallel.mpi_world_size({"OMPI_COMM_WORLD_SIZE": "4"}) == 4
    assert parallel.mpi_world_size({"PMI_SIZE": "3"}) == 3
    assert not parallel.launched_as_worker({"OMPI_COMM_WORLD_SIZE": "1"})
    assert parallel.launched_as_worker({"OMPI_COMM_WORLD_SIZE": "2"})
    assert parallel.launched_as_worker({parallel.NCCL_UID_VAR: "00"})


def test_nccl_with_one_rank_runs_the_multi_gpu_code_path(world, gpu):
    """Where one GPU is lent: NCCL all-reduce of a world of one must leave training unchanged."""
    if not parallel.nccl_available():
        pytest.skip("CuPy has no NCCL bindings")
    root, nets = world
    plain = caffe.get_solver(write_solver(root / "gpu_plain.prototxt", nets[B], root / "gpu_plain"))
    plain.step(ITERS)
    comm = parallel.NCCLComm(parallel.new_nccl_uid(), 0, 1)
    try:
        solver = caffe.get_solver(write_solver(root / "gpu_nccl.prototxt", nets[B], root / "gpu_nccl"))
        wrapped = parallel.ParallelSolver(solver, comm, bucket_mb=1e-6)
        wrapped.step(ITERS)
        for p, q in zip(plain.net.learnable_params, wrapped.net.learnable_params):
            np.testing.assert_allclose(backend.to_host(p.xdata), backend.to_host(q.xdata), rtol=0, atol=1e-6)
    finally:
        comm.close()


def test_bench_scale_quick_runs_one_and_two_processes(mpi, tmp_path):
    """benchmarks/bench_scale.py does not rot: both runs report images/s and a per-iteration share."""
    out_json = tmp_path / "scale.json"
    env = dict(mpi_env(), PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    bench = os.path.join(env["PYTHONPATH"], "benchmarks", "bench_scale.py")
    proc = subprocess.run([sys.executable, bench, "--quick", "--json", str(out_json)], capture_output=True,
                          text=True, env=env, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "comm share" in proc.stdout
    import json
    results = json.loads(out_json.read_text())
    assert [(r["procs"], r["comm"]) for r in results] == [(1, "local"), (2, "mpi")]
    for r in results:
        assert r["images_per_s"] > 0 and len(r["rows"]) == 2
        assert all(0 <= row["comm_s"] + row["wait_s"] <= row["fb_s"] for row in r["rows"])
    assert results[1]["nbytes"] == results[0]["nbytes"] > 0


def test_pycaffe_multiprocess_set_up_is_exported(solver_rank_reset):
    assert caffe.ParallelSolver is parallel.ParallelSolver
    caffe.set_solver_count(2)
    caffe.set_solver_rank(1)
    caffe.set_multiprocess(True)
    assert (caffe.solver_count(), caffe.solver_rank(), caffe.multiprocess()) == (2, 1, True)
    with pytest.raises(MinicaffeError, match=r"solver rank 2 is not in \[0, 2\)"):
        caffe.set_solver_rank(2)
