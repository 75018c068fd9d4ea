"""Tests of the launch scripts (launch/*.sh), run with bash in --dry-run mode.

The scripts run with a PATH that holds only a few basic tools (no gcloud, no
sbatch) and an environment without the caller's TPU_*/GCS_* settings. The
printed "+ " lines are split with shlex, so the tests also check the quoting.
"""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu_vm.sh"
SLURM = LAUNCH / "gpu_slurm.sh"
LOCAL = LAUNCH / "gpu_local.sh"
SCRIPTS = [TPU, SLURM, LOCAL]

BASH = shutil.which("bash")
# Tools the scripts may call; everything else (gcloud, sbatch, ...) is absent.
TOOLS = ["date", "git", "tar", "gzip", "mktemp", "rm", "mkdir", "cat", "env", "tee", "hostname",
         "cp", "id"]


@pytest.fixture(scope="module")
def tool_bin(tmp_path_factory):
  """A bin directory with symlinks to a few basic tools only."""
  bin_dir = tmp_path_factory.mktemp("bin")
  for tool in TOOLS:
    path = shutil.which(tool)
    if path:
      (bin_dir / tool).symlink_to(path)
  assert shutil.which("gcloud", path=str(bin_dir)) is None
  assert shutil.which("sbatch", path=str(bin_dir)) is None
  return bin_dir


@pytest.fixture
def sh(tool_bin, tmp_path):
  """Runs a launch script with bash; returns the CompletedProcess."""

  def run(script, *args, env=None, cwd=REPO):
    full_env = {"PATH": str(tool_bin), "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    full_env.update(env or {})
    return subprocess.run(
        [BASH, str(script), *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
    )

  return run


def commands(stdout, program=None):
  """The printed "+ " lines, each split into words as a shell would."""
  out = []
  for line in stdout.splitlines():
    if line.startswith("+ "):
      words = shlex.split(line[2:])
      if program is None or words[0] == program:
        out.append(words)
  return out


def option(words, name):
  """Value of --name=value in words (None when absent)."""
  values = [w.split("=", 1)[1] for w in words if w.startswith(name + "=")]
  assert len(values) <= 1, (name, words)
  return values[0] if values else None


def remote_words(words):
  """The --command=... of a gcloud ssh line, split into words (a ";" ending a
  statement is dropped from its last word)."""
  command = option(words, "--command")
  assert command is not None, words
  return [w[:-1] if w.endswith(";") else w for w in shlex.split(command)]


def ok(result):
  assert result.returncode == 0, result.stderr
  return result


# ---------------------------------------------------------------- all scripts


def test_scripts_parse():
  for script in SCRIPTS:
    subprocess.run([BASH, "-n", str(script)], check=True)
  if shutil.which("shellcheck"):
    run = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help(sh, script):
  result = ok(sh(script, "--help"))
  assert "Usage:" in result.stdout
  assert "Examples:" in result.stdout
  assert "--dry-run" in result.stdout


@pytest.mark.parametrize(
    "script,args",
    [(TPU, ["create"]), (TPU, ["run", "--bucket=b"]), (SLURM, []), (LOCAL, ["run"])],
    ids=["tpu-create", "tpu-run", "slurm", "local"],
)
def test_unknown_flag_is_rejected(sh, script, args):
  result = sh(script, *args, "--dry-run", "--bogus-flag=1")
  assert result.returncode != 0
  assert "unknown option: --bogus-flag=1" in result.stderr
  assert "+ " not in result.stdout


def test_option_of_another_command_is_rejected(sh):
  result = sh(TPU, "create", "--detach", "--dry-run")
  assert result.returncode != 0
  assert "--detach is not an option of 'create'" in result.stderr


# ---------------------------------------------------------------- tpu_vm.sh


def test_tpu_create_uses_given_settings(sh):
  result = ok(
      sh(TPU, "create", "--dry-run", "--name=my-tpu", "--zone=europe-west4-a",
         "--accelerator", "v4-32", "--version=tpu-vm-v4-base", "--project=proj-1", "--spot")
  )
  (words,) = commands(result.stdout)
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu"]
  assert option(words, "--accelerator-type") == "v4-32"
  assert option(words, "--zone") == "europe-west4-a"
  assert option(words, "--version") == "tpu-vm-v4-base"
  assert option(words, "--project") == "proj-1"
  assert "--spot" in words


def test_tpu_create_defaults(sh):
  (words,) = commands(ok(sh(TPU, "create", "--dry-run")).stdout)
  assert option(words, "--accelerator-type") == "v4-8"
  assert option(words, "--version") == "tpu-ubuntu2204-base"
  assert option(words, "--zone")
  assert option(words, "--project") is None


def test_tpu_flag_beats_environment(sh):
  env = {"TPU_NAME": "env-tpu", "TPU_ZONE": "env-zone", "TPU_ACCELERATOR": "v5p-8",
         "TPU_VERSION": "env-version", "GCP_PROJECT": "env-project"}
  result = ok(sh(TPU, "create", "--dry-run", "--zone=flag-zone", "--project=flag-project", env=env))
  (words,) = commands(result.stdout)
  assert words[5] == "env-tpu"
  assert option(words, "--zone") == "flag-zone"
  assert option(words, "--project") == "flag-project"
  assert option(words, "--accelerator-type") == "v5p-8"
  assert option(words, "--version") == "env-version"
  assert "env-zone" not in result.stdout and "env-project" not in result.stdout


def test_tpu_setup_copies_code_and_installs_on_all_workers(sh, tmp_path):
  result = ok(sh(TPU, "setup", "--dry-run", "--name=t1", "--zone=z1"))
  gcloud = commands(result.stdout, "gcloud")
  assert [w[4] for w in gcloud] == ["scp", "ssh"]
  scp, ssh = gcloud
  assert "--worker=all" in scp and "--worker=all" in ssh
  assert option(scp, "--zone") == "z1" and option(ssh, "--zone") == "z1"
  tarball = scp[5]
  assert tarball.endswith(".tar.gz") and scp[6].startswith("t1:")
  assert f"-czf {tarball}" in result.stdout  # the packing step makes that file
  assert "--exclude-standard" in result.stdout  # ignored files (workdir/, .venv/) stay out
  assert not list(tmp_path.glob("*.tar.gz"))  # dry run: nothing written
  remote = remote_words(ssh)
  r = remote.index("-r")
  assert remote[r + 1] == "~/mstkd_jax/requirements.txt"
  assert {"pip", "install"} <= set(remote[r - 4:r])
  # The lock first, then the TPU plugin of the JAX version it installed (a plugin must match
  # its jaxlib; installing it first would let the lock replace jax under it).
  j = next(i for i, w in enumerate(remote) if w.startswith("jax[tpu]=="))
  assert {"pip", "install"} <= set(remote[j - 4:j]) and r < j
  assert "import jax; print(jax.__version__)" in remote[j]
  assert "venv" in remote
  g = remote.index("gcsfuse")  # installed where missing, for run's bucket mount (data)
  assert remote[g - 2:g] == ["command", "-v"] and "apt_install" in remote[g:g + 40]


def test_tpu_run_passes_config_workdir_and_tfds_dir_on_the_bucket(sh):
  result = ok(
      sh(TPU, "run", "--dry-run", "--name=t1", "--bucket=gs://my-bucket/",
         "--run-name=exp1", "--config=configs/distill.py:tiny", "--", "--multihost=auto")
  )
  (words,) = commands(result.stdout)
  assert words[4:6] == ["ssh", "t1"]
  assert "--worker=all" in words
  remote = remote_words(words)
  # The workdir is the bucket itself (a gs:// URL); the data (array_record, read from local
  # paths only) come through the bucket mounted (where it is not yet) on every worker.
  assert "TFDS_DATA_DIR=/mnt/gcs/my-bucket/tensorflow_datasets" in remote
  g = remote.index("gcsfuse")
  assert remote[g + 1:g + 5] == ["--implicit-dirs", "--rename-dir-limit=1000000", "my-bucket",
                                 "/mnt/gcs/my-bucket"]
  assert remote.index("mountpoint") < g < remote.index("mstkd_jax.main")
  m = remote.index("mstkd_jax.main")
  assert remote[m - 1] == "-m"
  main_args = remote[m + 1:remote.index("2>&1")]
  assert "--config=configs/distill.py:tiny" in main_args
  assert "--workdir=gs://my-bucket/mstkd_jax/workdirs/exp1" in main_args
  # --multihost=true first; the words after -- come later and win.
  assert main_args[2:] == ["--multihost=true", "--multihost=auto"]
  # Every worker keeps its own log, and the script says how to get it.
  assert "tee" in remote
  assert "~/mstkd_logs/exp1.worker-$(hostname).log" in remote
  assert "scp" in result.stderr and "mstkd_logs/exp1" in result.stderr


def test_tpu_run_with_gcsfuse_puts_the_workdir_under_the_mount(sh):
  result = ok(sh(TPU, "run", "--dry-run", "--name=t1", "--bucket=my-bucket", "--gcsfuse",
                 "--run-name=exp1"))
  remote = remote_words(commands(result.stdout)[0])
  assert "TFDS_DATA_DIR=/mnt/gcs/my-bucket/tensorflow_datasets" in remote
  assert remote.index("gcsfuse") < remote.index("mstkd_jax.main")
  assert "--workdir=/mnt/gcs/my-bucket/mstkd_jax/workdirs/exp1" in remote
  # Nothing under the mount (another bucket's mount is not under it): nothing is mounted.
  result = ok(sh(TPU, "run", "--dry-run", "--bucket=b", "--workdir=/shared/wd",
                 "--tfds-data-dir=/mnt/gcs/b2/tfds"))
  assert "gcsfuse" not in remote_words(commands(result.stdout)[0])


def test_tpu_run_bucket_flag_beats_environment_and_workdir_override(sh):
  result = ok(
      sh(TPU, "run", "--dry-run", "--bucket=flag-bucket", "--run-name=r",
         "--workdir=/shared/wd", env={"GCS_BUCKET": "env-bucket"})
  )
  remote = remote_words(commands(result.stdout)[0])
  assert "TFDS_DATA_DIR=/mnt/gcs/flag-bucket/tensorflow_datasets" in remote
  assert "--workdir=/shared/wd" in remote
  assert "env-bucket" not in result.stdout
  result = ok(sh(TPU, "run", "--dry-run", "--bucket=b", "--workdir=gs://other/wd"))
  assert "--workdir=gs://other/wd" in remote_words(commands(result.stdout)[0])


def test_tpu_run_refuses_a_url_data_folder(sh):
  result = sh(TPU, "run", "--dry-run", "--bucket=b", "--tfds-data-dir=gs://b/x")
  assert result.returncode != 0 and not commands(result.stdout)
  assert "--tfds-data-dir=gs://b/x is a URL; the prepared data sets are array_record" in (
      result.stderr)
  assert "/mnt/gcs/b" in result.stderr


def test_tpu_run_quotes_arguments_with_spaces_and_quotes(sh):
  result = ok(
      sh(TPU, "run", "--dry-run", "--bucket=b", "--run-name=r",
         "--config.name=my run", "--", "--note", "it's a test", "$(touch x)")
  )
  remote = remote_words(commands(result.stdout)[0])
  m = remote.index("mstkd_jax.main")
  assert remote[m + 4:m + 8] == ["--config.name=my run", "--note", "it's a test", "$(touch x)"]


def test_tpu_run_remote_command_runs_in_bash(sh, tool_bin, tmp_path):
  """Runs the printed remote command here, with a fake venv python in $HOME."""
  result = ok(sh(TPU, "run", "--dry-run", "--bucket=b", "--run-name=r", "--config.name=my run",
                 "--", "it's", "$(echo no)"))
  command = option(commands(result.stdout)[0], "--command")
  home = tmp_path / "home"
  (home / "mstkd_jax").mkdir(parents=True)
  python = home / "mstkd_venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text('#!/bin/bash\necho "TFDS=$TFDS_DATA_DIR"\nprintf "<%s>\\n" "$@"\n')
  python.chmod(0o755)
  # Stand-ins for the worker's mount tools: nothing is mounted yet; calls are logged.
  fakes = tmp_path / "fakes"
  fakes.mkdir()
  for tool, body in (("mountpoint", "exit 1"), ("sudo", 'echo "sudo $*" >> "$HOME/calls"'),
                     ("gcsfuse", 'echo "gcsfuse $*" >> "$HOME/calls"')):
    (fakes / tool).write_text(f"#!/bin/bash\n{body}\n")
    (fakes / tool).chmod(0o755)
  run = subprocess.run([BASH, "-c", command],
                       env={"PATH": f"{fakes}:{tool_bin}", "HOME": str(home)},
                       capture_output=True, text=True, timeout=30)
  assert run.returncode == 0, run.stderr
  assert (home / "calls").read_text().splitlines() == [
      "sudo mkdir -p /mnt/gcs/b", f"sudo chown {os.getuid()}:{os.getgid()} /mnt/gcs/b",
      "gcsfuse --implicit-dirs --rename-dir-limit=1000000 b /mnt/gcs/b"]
  expected = ["TFDS=/mnt/gcs/b/tensorflow_datasets", "<-m>", "<mstkd_jax.main>",
              "<--config=configs/distill.py>", "<--workdir=gs://b/mstkd_jax/workdirs/r>",
              "<--multihost=true>",
              "<--config.name=my run>", "<it's>", "<$(echo no)>"]
  assert run.stdout.splitlines()[-len(expected):] == expected
  (log,) = (home / "mstkd_logs").glob("r.worker-*.log")
  assert log.read_text().splitlines() == expected


def test_tpu_setup_packs_the_checkout(tool_bin, tmp_path):
  """setup without --dry-run, with a fake gcloud that keeps the tarball it is given."""
  fake_bin = tmp_path / "fake_bin"
  fake_bin.mkdir()
  gcloud = fake_bin / "gcloud"
  gcloud.write_text('#!/bin/bash\necho "$*" >> "$HOME/gcloud.log"\n'
                    'if [ "$4" = scp ]; then cp "$5" "$HOME/src.tar.gz"; fi\n')
  gcloud.chmod(0o755)
  env = {"PATH": f"{fake_bin}:{tool_bin}", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
  run = subprocess.run([BASH, str(TPU), "setup", "--name=t1"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=30)
  assert run.returncode == 0, run.stderr
  calls = (tmp_path / "gcloud.log").read_text().splitlines()
  assert [c.split()[:4] for c in calls] == [["compute", "tpus", "tpu-vm", "scp"],
                                            ["compute", "tpus", "tpu-vm", "ssh"]]
  names = subprocess.run(["tar", "-tzf", str(tmp_path / "src.tar.gz")], capture_output=True,
                         text=True, check=True).stdout.splitlines()
  assert "launch/tpu_vm.sh" in names and "requirements.txt" in names
  assert not [n for n in names if n.startswith((".git/", "workdir/", ".venv/"))]
  assert not list(tmp_path.glob("mstkd_tpu.*"))  # the temporary directory is gone


def test_tpu_run_detach(sh):
  result = ok(sh(TPU, "run", "--dry-run", "--bucket=b", "--run-name=r", "--detach"))
  remote = remote_words(commands(result.stdout)[0])
  assert "nohup" in remote and "&" in remote and "tee" not in remote


def test_tpu_run_needs_a_bucket(sh):
  result = sh(TPU, "run", "--dry-run")
  assert result.returncode != 0
  assert "--bucket" in result.stderr and "GCS_BUCKET" in result.stderr


def test_tpu_ssh_and_delete(sh):
  (words,) = commands(ok(sh(TPU, "ssh", "--dry-run", "--worker=all", "--", "ls", "-la")).stdout)
  assert "--worker=all" in words and option(words, "--command") == "ls -la"
  result = sh(TPU, "ssh", "--dry-run", "--worker=all")
  assert result.returncode != 0 and "needs a command" in result.stderr
  (words,) = commands(ok(sh(TPU, "delete", "--dry-run", "--yes", "--name=t9")).stdout)
  assert words[4:6] == ["delete", "t9"] and "--quiet" in words


@pytest.mark.parametrize("args", [["create"], ["setup"], ["run", "--bucket=b"], ["delete"]])
def test_tpu_without_gcloud_says_what_to_install(sh, tmp_path, args):
  result = sh(TPU, *args)
  assert result.returncode != 0
  assert "Google Cloud CLI" in result.stderr
  assert "install" in result.stderr
  assert not list(tmp_path.glob("mstkd_tpu.*"))  # gave up before packing anything


# ---------------------------------------------------------------- gpu_slurm.sh


def test_slurm_batch_script(sh, tmp_path):
  result = ok(
      sh(SLURM, "--dry-run", "--nodes=3", "--gpus-per-node=4", "--cpus-per-task=6",
         "--partition=gpu", "--time=02:00:00", "--run-name=s1", "--config=configs/distill.py:p",
         "--tfds-data-dir=/data/my tfds", "--config.name=my run", "--", "--extra=1")
  )
  lines = result.stdout.splitlines()
  for expected in ["#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=4",
                   "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=6",
                   "#SBATCH --partition=gpu", "#SBATCH --time=02:00:00"]:
    assert expected in lines
  (srun_line,) = [line for line in lines if line.startswith("srun ")]
  srun = shlex.split(srun_line)
  assert option(srun, "--ntasks-per-node") == "4"
  assert option(srun, "--nodes") == "3"
  m = srun.index("mstkd_jax.main")
  assert srun[m - 1] == "-m" and srun[m - 2].endswith("/bin/python")
  assert srun[m + 1:] == ["--config=configs/distill.py:p", f"--workdir={REPO}/workdir/s1",
                          "--multihost=true", "--config.name=my run", "--extra=1"]
  assert "export TFDS_DATA_DIR='/data/my tfds'" in lines
  (sbatch,) = commands(result.stdout)
  assert sbatch[0] == "sbatch" and sbatch[1].endswith("/s1.sbatch")
  # The printed batch script is valid bash.
  script = result.stdout.split("#!/bin/bash", 1)[1].split("# ---- end", 1)[0]
  (tmp_path / "job.sh").write_text("#!/bin/bash" + script)
  subprocess.run([BASH, "-n", str(tmp_path / "job.sh")], check=True)


def test_slurm_rejects_bad_counts(sh):
  result = sh(SLURM, "submit", "--dry-run", "--nodes=0")
  assert result.returncode != 0 and "--nodes" in result.stderr


def test_slurm_setup_installs_jax_cuda_and_requirements(sh):
  result = ok(sh(SLURM, "setup", "--dry-run", "--venv=/shared/venv", "--python=python3.12"))
  cmds = commands(result.stdout)
  assert cmds[0] == ["python3.12", "-m", "venv", "/shared/venv"]
  pip = ["/shared/venv/bin/python", "-m", "pip", "install"]
  lock = cmds.index([*pip, "-r", f"{REPO}/requirements.txt"])
  # Then the CUDA plugin of the JAX version the lock installed (read from the venv).
  assert cmds[lock + 1] == [*pip, "jax[cuda12]==<the JAX version of the lock>"]


def test_slurm_without_sbatch_fails_clearly(sh, tmp_path):
  log_dir = tmp_path / "logs"
  result = sh(SLURM, "--nodes=2", f"--log-dir={log_dir}")
  assert result.returncode != 0
  assert "sbatch" in result.stderr and "SLURM" in result.stderr
  assert not log_dir.exists()


# ---------------------------------------------------------------- gpu_local.sh


def test_local_run_command(sh, tmp_path):
  result = ok(
      sh(LOCAL, "run", "--dry-run", "--run-name=l1", "--config=configs/distill.py:p",
         "--config.name=my run", "--", "--extra=1",
         env={"CUDA_VISIBLE_DEVICES": "2,3", "TFDS_DATA_DIR": "/data/tfds"})
  )
  cmds = commands(result.stdout)
  assert cmds[0] == ["cd", str(REPO)]
  run = cmds[1]
  assert run[:3] == ["env", "CUDA_VISIBLE_DEVICES=2,3", "TFDS_DATA_DIR=/data/tfds"]
  assert run[3:6] == [f"{REPO}/.venv/bin/python", "-m", "mstkd_jax.main"]
  assert run[6:] == ["--config=configs/distill.py:p", f"--workdir={REPO}/workdir/l1",
                     "--multihost=false", "--config.name=my run", "--extra=1"]


def test_local_gpus_flag_and_relative_workdir(sh, tmp_path):
  result = ok(sh(LOCAL, "run", "--dry-run", "--gpus=1", "--workdir=wd",
                 env={"CUDA_VISIBLE_DEVICES": "0"}, cwd=tmp_path))
  run = commands(result.stdout)[1]
  assert "CUDA_VISIBLE_DEVICES=1" in run and "CUDA_VISIBLE_DEVICES=0" not in run
  assert f"--workdir={tmp_path}/wd" in run


def test_local_setup(sh):
  cmds = commands(ok(sh(LOCAL, "setup", "--dry-run")).stdout)
  assert cmds[0] == ["python3", "-m", "venv", f"{REPO}/.venv"]
  pip = [f"{REPO}/.venv/bin/python", "-m", "pip", "install"]
  lock = cmds.index([*pip, "-r", f"{REPO}/requirements.txt"])
  assert cmds[lock + 1] == [*pip, "jax[cuda12]==<the JAX version of the lock>"]
