"""Faults beyond Ctrl-C: a killed main process, signals to the whole process group, full and read-only disks,
and every half-finished state a fault leaves, each with its way out (docs/training.md, "Faults").

Subprocesses only where a real signal or kill is needed; the rest provoke the fault in process (a mocked write
that raises ENOSPC, a planted half-finished state)."""
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import fastgan.atomic
import fastgan.checkpoint
import fastgan.report
from fastgan.cli import main
from fastgan.data import cache

from test_resume import TINY, assert_same_training, load, on_call, train


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---- 1. a main process killed by SIGKILL (the OOM killer) takes its decoding workers with it ----------------

HOLDER = """
import os, sys, time
from fastgan.data.files import parallel_map

def hold(i):  # a worker busy with a long decode
    open(os.path.join(sys.argv[1], str(os.getpid())), "w").close()
    time.sleep(120)
    return i

with parallel_map(hold, range(64), 2) as results:
    next(results)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_decoding_workers_die_with_a_main_process_killed_by_sigkill(tmp_path):
    """The file check and `prepare` decode in a process pool; a kill -9 of the main process alone must not leave
    the workers alive, blocked on results no one reads and holding the cache's lock."""
    main_process = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)])
    try:
        assert wait_for(lambda: len(list(tmp_path.iterdir())) == 2), "the workers did not start"
        workers = [int(p.name) for p in tmp_path.iterdir()]
        os.kill(main_process.pid, signal.SIGKILL)  # the main process only, as the OOM killer does
        main_process.wait(timeout=30)
        assert wait_for(lambda: not any(map(alive, workers)), 30), "a worker outlived its killed parent"
    finally:
        main_process.kill()
        for pid in [int(p.name) for p in tmp_path.iterdir()]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_run_waiting_for_the_cache_lock_says_whose_it_is(tmp_path):
    path = tmp_path / "faces.fgd"
    said, entered = [], threading.Event()
    with cache.writing_lock(path):  # another run writing this cache file
        assert path.with_suffix(".lock").read_text() == str(os.getpid())  # its holder's process id
        def wait():
            with cache.writing_lock(path, said.append):
                entered.set()
        waiter = threading.Thread(target=wait)
        waiter.start()
        assert wait_for(lambda: said, 30)
        assert not entered.is_set()  # it waits, and has said so
    waiter.join(30)
    assert entered.is_set()
    assert said == [f"waiting for process {os.getpid()}, which is writing the cache file faces.fgd (its lock "
                    f"{path.with_suffix('.lock')}); this run then uses that file"]


# ---- 2, 3. a scheduler's SIGTERM to the whole group, and SIGHUP ------------------------------------------------

def test_sigterm_to_the_whole_process_group_with_loader_workers_checkpoints(image_folder, tmp_path):
    """docker stop, systemd and Slurm's scancel signal every process of the group: the DataLoader workers must
    ignore it, so that the training process finishes its step and writes its checkpoint."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "fastgan", "train", *TINY[:10], "--device", "cpu", "--loader", "torch",
               "--workers", "2", "--quiet", "--log-every", "1", "--sample-every", "1000",
               "--root", str(image_folder), "--out", str(run), "--epochs", "1000"]
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = run / "metrics.jsonl"
    wait_for(lambda: child.poll() is not None or (metrics.exists() and len(metrics.read_text().splitlines()) >= 4),
             120)
    os.killpg(child.pid, signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at iteration" in err and "Traceback" not in err, err
    saved = load(run / "checkpoints" / "last.pt")
    assert saved["step"] >= 4 and len(saved["loss_history"]) == saved["step"]


def test_sighup_stops_like_sigterm(image_folder, tmp_path, monkeypatch, capfd):
    """A closed terminal or a dropped ssh session: the step ends, a checkpoint is written, exit 129."""
    run = tmp_path / "run"

    def unhandled(signum, frame):  # (instead of the default, which would end pytest itself)
        raise AssertionError("SIGHUP reached the caller's handler: the run did not handle it")
    before = signal.signal(signal.SIGHUP, unhandled)
    try:
        on_call(monkeypatch, {2: lambda args: os.kill(os.getpid(), signal.SIGHUP)})
        assert train("--root", image_folder, "--out", run, "--epochs", 3) == 128 + signal.SIGHUP
        assert "stopped by SIGHUP at iteration 2" in capfd.readouterr().err
        assert load(run / "checkpoints" / "last.pt")["step"] == 2
        assert signal.getsignal(signal.SIGHUP) is unhandled  # the caller's handler is put back
    finally:
        signal.signal(signal.SIGHUP, before)


# ---- 4. half-finished ends: each has a way out ---------------------------------------------------------------

def test_a_run_killed_after_its_final_checkpoint_finishes_its_end_products_on_resume(image_folder, tmp_path, capfd):
    run = tmp_path / "run"
    assert train("--root", image_folder, "--out", run, "--epochs", 2) == 0
    for name in ("netG.pth", "loss.png", "progress.gif"):  # the kill came before the end products
        (run / name).unlink()
    capfd.readouterr()
    assert main(["train", "--out", str(run), "--resume", "auto"]) == 0
    err = " ".join(capfd.readouterr().err.split())
    assert f"{run / 'checkpoints' / 'last.pt'} is the run's final checkpoint (2 epochs): wrote the end products" in err
    final = load(run / "checkpoints" / "last.pt")
    assert all(torch.equal(v, final["netG"][k]) for k, v in load(run / "netG.pth").items())
    assert (run / "loss.png").is_file() and (run / "progress.gif").is_file()
    assert main(["train", "--out", str(run), "--resume", "auto"]) == 2  # a whole run: nothing left to do
    assert "has already trained 2 epochs; pass --epochs larger than 2" in capfd.readouterr().err


def test_a_kill_between_the_epoch_file_and_last_pt_resumes_from_the_epoch_file(image_folder, tmp_path, monkeypatch,
                                                                                capfd):
    run, links = tmp_path / "run", [0]
    real_link = fastgan.checkpoint.link_or_copy

    def killed_at_the_second(source, target):
        links[0] += 1
        if links[0] == 2:  # epoch002.pt is written, last.pt still points at epoch001.pt
            raise KeyboardInterrupt
        real_link(source, target)
    monkeypatch.setattr(fastgan.checkpoint, "link_or_copy", killed_at_the_second)
    assert train("--root", image_folder, "--out", run, "--epochs", 3) == 130
    monkeypatch.undo()
    assert load(run / "checkpoints" / "last.pt")["epoch"] == 1 and (run / "checkpoints" / "epoch002.pt").is_file()
    capfd.readouterr()
    assert main(["train", "--out", str(run), "--resume", "auto"]) == 0
    err = " ".join(capfd.readouterr().err.split())
    assert (f"epoch002.pt is newer than last.pt (the run ended between writing the two): resuming from "
            f"{run / 'checkpoints' / 'epoch002.pt'}") in err
    assert load(run / "checkpoints" / "last.pt")["epoch"] == 3 and (run / "netG.pth").is_file()
    straight = tmp_path / "straight"
    assert train("--root", image_folder, "--out", straight, "--epochs", 3) == 0
    assert_same_training(run, straight)  # nothing lost, nothing trained twice


# ---- 5. a full disk: one line naming the file, its folder and the room left; records whole or not at all ---------

class FullFile:
    """A file on a disk that fills during this write: half the bytes land, then ENOSPC."""

    def __init__(self, file):
        self._file = file

    def write(self, data):
        self._file.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._file, name)


def fill_the_disk_at(monkeypatch, name: str, when: bytes = b""):
    """Writes of the file `name` (through its temporary file, or appended) find the disk full, from the first write
    holding `when`."""
    real_fdopen, real_open = os.fdopen, open

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        return FullFile(f) if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{name}.") else f

    class FullFrom(FullFile):
        def write(self, data):
            return (FullFile.write if when in data else lambda self, d: self._file.write(d))(self, data)

    def open_(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        return FullFrom(f) if Path(path).name == name else f
    monkeypatch.setattr(fastgan.atomic.os, "fdopen", fdopen)
    monkeypatch.setattr(fastgan.report, "open", open_, raising=False)


@pytest.mark.parametrize("name, when", [("epoch002.pt", b""), ("fake_step0000004.png", b""), ("netG.pth", b""),
                                        ("metrics.jsonl", b'"step": 4,')])
def test_a_full_disk_is_one_line_and_the_run_goes_on_from_its_last_checkpoint(image_folder, tmp_path, monkeypatch,
                                                                                capfd, name, when):
    run, straight = tmp_path / "run", tmp_path / "straight"
    assert train("--root", image_folder, "--out", straight, "--epochs", 2) == 0
    fill_the_disk_at(monkeypatch, name, when)
    capfd.readouterr()
    assert train("--root", image_folder, "--out", run, "--epochs", 2) == 2
    err = capfd.readouterr().err
    folder = run / "checkpoints" if name.endswith(".pt") else run / "samples" if name.endswith(".png") else run
    assert "Traceback" not in err and err.count("error") == 1, err
    assert err.strip().splitlines()[-1].startswith("fastgan: error: cannot write"), err  # one line, the last
    assert f"cannot write {name} in {folder}: No space left on device (" in " ".join(err.split())
    assert f"MB free there); free some room there, then continue with: fastgan train --out {run} --resume auto" \
        in " ".join(err.split())
    assert not [p for p in run.rglob(".*.tmp")]  # no temporary file left
    assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())  # no torn record
    monkeypatch.undo()
    assert main(["train", "--out", str(run), "--resume", "auto"]) == 0
    assert_same_training(run, straight)  # nothing lost


def test_a_resume_drops_a_torn_last_record_of_metrics_jsonl(image_folder, tmp_path, monkeypatch):
    run = tmp_path / "run"
    on_call(monkeypatch, {5: lambda args: os.kill(os.getpid(), signal.SIGTERM)})
    assert train("--root", image_folder, "--out", run, "--epochs", 2) == 128 + signal.SIGTERM
    monkeypatch.undo()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "iteration": 1, "step": 4, "Loss_D": 1.')  # a record cut short by a kill
    assert main(["train", "--out", str(run), "--resume", "auto"]) == 0
    assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())


def test_a_really_full_disk_under_torch_save_and_pil_is_one_line(tmp_path):
    """On a real full disk torch.save and PIL hide the ENOSPC under errors of their own; a 1 MB tmpfs (where this
    machine lets the tests mount one) shows that the line still names the file and the room left."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("no tmpfs mount here")
    try:
        from PIL import Image
        from fastgan.atomic import DiskFull
        from fastgan.checkpoint import write_file
        from fastgan.report import save_image_atomic
        with pytest.raises(DiskFull, match=f"cannot write x.pt in {small}: No space left on device \\("):
            write_file(small / "x.pt", {"weights": torch.zeros(1 << 20)})
        noise = torch.randint(0, 255, (1000, 1000, 3), dtype=torch.uint8).numpy()
        with pytest.raises(DiskFull, match=f"cannot write g.png in {small}: No space left on device \\("):
            save_image_atomic(Image.fromarray(noise), small / "g.png")
        assert list(small.iterdir()) == []  # no temporary file left
    finally:
        subprocess.run(["umount", str(small)])


# ---- 6. read-only places: the cache, a shared pre-filled cache, HOME, `cache clear`, --out -----------------------

@pytest.fixture
def read_only(tmp_path):
    """make(folder): `folder` made read-only, and the strerror its writes then fail with. As root (who ignores
    file permissions) a read-only bind mount of it, where this machine allows mounts: "Read-only file system";
    as another user a chmod 555: "Permission denied". Skipped as root without mounts."""
    mounted = []

    def make(folder: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            folder.chmod(0o555)
            mounted.append((None, folder))
            return "Permission denied"
        bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
        if bind.returncode:
            pytest.skip("root without mounts: no read-only folder to be had")
        mounted.append(("mount", folder))
        assert not subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode
        return "Read-only file system"
    yield make
    for how, folder in reversed(mounted):
        if how == "mount":
            subprocess.run(["umount", str(folder)])
        else:
            folder.chmod(0o755)


def test_a_read_only_cache_dir_decodes_every_epoch_and_says_so(image_folder, tmp_path, read_only, capfd):
    cache_dir = tmp_path / "shared"
    why = read_only(cache_dir)
    capfd.readouterr()
    assert train("--root", image_folder, "--out", tmp_path / "run", "--cache-dir", cache_dir, "--epochs", 1) == 0
    out = " ".join(capfd.readouterr().err.split())
    assert (f"fastgan: decoding every epoch (torch), not once into a cache: the cache folder {cache_dir} is not "
            f"writable ({why}); a writable --cache-dir decodes once") in out
    assert load(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 1
    # --loader cache, asked for, is refused in one line
    assert train("--root", image_folder, "--out", tmp_path / "run2", "--cache-dir", cache_dir, "--loader", "cache",
                 "--epochs", 1) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines() == [
        f"fastgan: error: --loader cache cannot write its file: the cache folder {cache_dir} is not writable ({why}); "
        "choose a writable --cache-dir, or decode every epoch with --loader torch"]


def test_a_read_only_cache_that_holds_the_file_is_used_as_it_is(image_folder, tmp_path, read_only, capfd):
    """A shared, pre-filled cache: the run uses the file (and cannot update its date, which stays)."""
    cache_dir = tmp_path / "shared"
    assert train("--root", image_folder, "--out", tmp_path / "fill", "--cache-dir", cache_dir, "--epochs", 1) == 0
    (cached_file,) = cache_dir.glob("*.fgd")
    before = cached_file.stat().st_mtime_ns
    read_only(cache_dir)
    capfd.readouterr()
    assert train("--root", image_folder, "--out", tmp_path / "run", "--cache-dir", cache_dir, "--epochs", 1) == 0
    out = " ".join(capfd.readouterr().err.split())
    assert "loader cache (" in out and "decoding every epoch" not in out
    assert cached_file.stat().st_mtime_ns == before
    assert_same_training(tmp_path / "run", tmp_path / "fill")


def test_a_read_only_home_trains_a_folder_and_refuses_the_demo_in_one_line(image_folder, tmp_path, read_only,
                                                                             monkeypatch, capfd):
    home = tmp_path / "home"
    why = read_only(home)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(home))
    capfd.readouterr()
    assert train("--root", image_folder, "--out", tmp_path / "run", "--epochs", 1) == 0  # no cache: decoded per epoch
    assert f"the cache folder {home / '.cache' / 'fastgan' / 'prepared'} is not writable ({why})" in \
        " ".join(capfd.readouterr().err.split())
    assert main(["train", *TINY, "--out", str(tmp_path / "demo"), "--demo-images", "64", "--epochs", "1"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines() == [
        f"fastgan: error: cannot draw the demo faces into {home / '.cache' / 'fastgan'}: {why}; free some room there "
        "or set XDG_CACHE_HOME to a writable folder, or give --root a folder of images"]


def test_cache_clear_of_a_read_only_cache_is_one_line_and_keeps_the_files(image_folder, tmp_path, read_only, capfd):
    cache_dir = tmp_path / "shared"
    assert train("--root", image_folder, "--out", tmp_path / "fill", "--cache-dir", cache_dir, "--epochs", 1) == 0
    (cached_file,) = cache_dir.glob("*.fgd")
    why = read_only(cache_dir)
    capfd.readouterr()
    assert main(["cache", "clear", "--cache-dir", str(cache_dir)]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines() == [
        f"fastgan: error: cannot remove {cached_file.name} from {cache_dir} ({why}); 0 removed before it. Clear the "
        "cache where its folder is writable, or choose another --cache-dir"]
    assert cached_file.is_file()


def test_a_read_only_out_says_read_only_file_system_not_permission_denied(image_folder, tmp_path, read_only, capfd):
    parent = tmp_path / "parent"
    (parent / "empty").mkdir(parents=True)
    why = read_only(parent)
    capfd.readouterr()
    assert train("--root", image_folder, "--out", parent / "new", "--epochs", 1) == 2
    assert capfd.readouterr().err.strip() == \
        f"fastgan: error: --out {parent / 'new'} is not writable ({why}: {parent}); choose another folder"
    assert train("--root", image_folder, "--out", parent / "empty", "--epochs", 1) == 2
    assert capfd.readouterr().err.strip() == \
        f"fastgan: error: --out {parent / 'empty'} is not writable ({why}); choose another folder"


# ---- 8. leftovers that fill a disk: what no live process holds is cleared, and counted --------------------------

def test_a_demo_drawing_cut_short_by_a_full_disk_leaves_nothing_and_is_one_line(tmp_path, monkeypatch, capfd):
    from fastgan.data import demo
    real_write = demo.write_faces

    def full(folder, n, **kwargs):  # a few faces land, then the disk is full
        real_write(folder, 2, seed=0)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(demo, "write_faces", full)
    # a cache of its own: in the suite's shared cache an earlier test may have drawn these 64 faces already
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    capfd.readouterr()
    assert main(["train", *TINY, "--out", str(tmp_path / "run"), "--demo-images", "64", "--epochs", "1"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        f"fastgan: error: cannot draw the demo faces into {demo.cache_dir()}: No space left on device; free some room")
    assert not [p for p in demo.cache_dir().iterdir() if ".tmp" in p.name]  # no half-drawn folder left


def test_the_folder_of_a_killed_demo_drawing_is_removed_and_counted_and_a_live_one_kept(tmp_path, monkeypatch,
                                                                                       capfd):
    import fcntl
    from fastgan.data import demo
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a cache of its own: the counts are exact
    cache = demo.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    killed, live = (demo.demo_folder(64).with_name(f"{demo.demo_folder(64).name}.tmp{pid}") for pid in (1, 2))
    for folder in (killed, live):
        folder.mkdir()
        (folder / "000001.jpg").write_bytes(b"x" * 1000)
        (folder / demo.DRAWING).write_text("")
    with open(live / demo.DRAWING) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a drawing in progress (its process holds the lock)
        capfd.readouterr()
        assert main(["cache", "list"]) == 0
        assert "; and 1 leftover of killed writes, 1.0 KB (fastgan cache clear removes them)" in capfd.readouterr().out
        assert main(["cache", "clear"]) == 0
        assert "removed 0 cache files and 1 leftover of killed writes (1.0 KB freed)" in capfd.readouterr().out
        assert not killed.exists() and live.exists()
        (killed / "000001.jpg").parent.mkdir()
        (killed / demo.DRAWING).write_text("")
        demo.demo_faces(64, quiet=True)  # the next drawing removes a killed one's folder too
        assert not killed.exists() and live.exists()


def test_leftovers_of_killed_writes_are_removed_where_no_process_holds_them(image_folder, tmp_path):
    """A checkpoint write, a prepare, a cache write killed part-way leave a hidden temporary file (each the size of
    the model or of the decoded images): the next run into the folder, the next prepare of the file and `cache
    clear` remove them, and never a write still in progress (its writer holds an flock on it)."""
    from fastgan.atomic import atomic_write
    from fastgan.data.files import index_images
    from fastgan.data.prepared import prepare
    run = tmp_path / "run"
    assert train("--root", image_folder, "--out", run, "--epochs", 1) == 0
    killed = [run / "checkpoints" / ".last.pt.k1.tmp", run / "samples" / ".real.png.k2.tmp", run / ".netG.pth.k3.tmp"]
    for path in killed:
        path.write_bytes(b"half")
    with atomic_write(run / "checkpoints" / "epoch009.pt") as writing:  # a live write (in another folder's run,
        writing.write(b"going on")                                    # say): its temporary file stays
        (live,) = [p for p in (run / "checkpoints").glob(".epoch009.pt.*.tmp")]
        assert main(["train", "--out", str(run), "--resume", "auto", "--epochs", "2"]) == 0
        assert not any(p.exists() for p in killed) and live.exists()
    out = tmp_path / "faces.fgd"
    (tmp_path / ".faces.fgd.k4.tmp").write_bytes(b"half")
    (tmp_path / ".other.fgd.k5.tmp").write_bytes(b"half")  # another file's: not this prepare's to remove
    prepare(index_images(image_folder), out, 16, 3, workers=1)
    assert not (tmp_path / ".faces.fgd.k4.tmp").exists() and (tmp_path / ".other.fgd.k5.tmp").exists()


# ---- 7. odd entries under --root are set aside with their reason, not fatal --------------------------------------

def test_a_broken_symlink_a_symlink_loop_and_a_name_not_utf8_are_set_aside(image_folder, tmp_path, capfd):
    faces = image_folder / "faces"
    (faces / "broken.jpg").symlink_to(faces / "gone.jpg")
    (faces / "loop.jpg").symlink_to(faces / "loop.jpg")
    odd = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not UTF-8, the name has a lone surrogate in Python
    (faces / odd).write_bytes((faces / "0000.jpg").read_bytes())
    run = tmp_path / "run"
    capfd.readouterr()
    assert train("--root", image_folder, "--out", run, "--epochs", 1) == 0
    assert "Traceback" not in capfd.readouterr().err
    skipped = dict(line.split("\t") for line in (run / "skipped_files.txt").read_text().splitlines())
    assert skipped == {str(faces / "broken.jpg"): "FileNotFoundError: No such file or directory (a broken symlink)",
                       str(faces / "loop.jpg"): "OSError: Too many levels of symbolic links (a broken symlink)",
                       str(faces) + "/caf\\udce9.jpg": "its name is not valid UTF-8; rename it"}
    assert load(run / "checkpoints" / "last.pt")["epoch"] == 1
