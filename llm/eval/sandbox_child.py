"""The first code a sandboxed program's process runs: limits, a guard, then the program (``llm.eval.sandbox``).

``llm.eval.sandbox.run_program`` starts ``python -I -S -B -X utf8 sandbox_child.py CONFIG`` in a
fresh session and an empty temporary folder (CONFIG: a dict, ``marshal``-ed, in hex). This script
imports only a few built-in modules, for a fast start (no ``json``, ``re`` or ``enum``; ``-S`` skips
the ``site`` hooks of ``.pth`` files, whose site-packages folders are put on the path directly), then:

1. sets resource limits: address space (memory), CPU seconds, the size of any file written, open
   files, no core dumps, and, for a user other than root, a cap on processes (root ignores
   RLIMIT_NPROC; the parent counts and kills instead);
2. makes itself a child subreaper (Linux) and forks: the program runs in the child, and this
   process supervises it. Orphaned descendants are re-parented to the supervisor instead of init,
   so nothing the program starts can leave its process tree; when the program's process ends,
   the supervisor kills whatever is left and exits with the program's status (or its signal);
3. installs the guard (unless disabled): an audit hook (PEP 578) that refuses to write, delete,
   rename or change files outside the folder, and refuses to start processes, send signals,
   call C functions through ctypes, raise resource limits or open network connections. A
   refused operation raises ``PermissionError`` inside the program. The guard stops accidents,
   not a determined attacker; the limits and the parent's kill are the containment;
4. runs the program's source (in the child) as a module named ``run_name`` (``"__main__"`` for a
   script) and reports on the file descriptor ``report_fd`` that it started it, then whether it
   returned or called ``exit`` (a sandbox that fails before "started" is an error, not a failure).
"""

import builtins
import marshal
import os
import sys


def _set_limit(resource, which, value):
    """Lowers a limit to ``value`` (never above the current hard limit, which only root may raise)."""
    soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def _user_tasks(uid):
    """How many tasks (threads of all processes) the user ``uid`` runs now: what RLIMIT_NPROC counts."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat("/proc/" + name).st_uid != uid:
                continue
            with open("/proc/" + name + "/stat", "rb") as f:
                total += int(f.read().rsplit(b")", 1)[1].split()[17])  # field 20: num_threads
        except (OSError, ValueError, IndexError):
            continue
    return total


def apply_limits(config):
    """Sets the resource limits of this process (inherited by every process it starts)."""
    import resource

    _set_limit(resource, resource.RLIMIT_AS, config["memory_bytes"])
    cpu = config["cpu_seconds"]
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1 if hard == resource.RLIM_INFINITY else min(cpu + 1, hard)))
    _set_limit(resource, resource.RLIMIT_FSIZE, config["file_bytes"])
    _set_limit(resource, resource.RLIMIT_NOFILE, config["open_files"])
    _set_limit(resource, resource.RLIMIT_CORE, 0)
    if hasattr(resource, "RLIMIT_NPROC") and os.getuid() != 0 and os.path.isdir("/proc"):
        _set_limit(resource, resource.RLIMIT_NPROC, _user_tasks(os.getuid()) + config["max_processes"])


def become_subreaper():
    """Linux: orphaned descendants are re-parented to this process instead of init (prctl PR_SET_CHILD_SUBREAPER).

    Calls ``prctl`` through the C module ``_ctypes``: ``import ctypes`` would cost ~8 ms of CPU per program.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import _ctypes

        c_int = type("c_int", (_ctypes._SimpleCData,), {"_type_": "i"})
        prctl = type("prctl", (_ctypes.CFuncPtr,), {"_flags_": _ctypes.FUNCFLAG_CDECL, "_restype_": c_int})(
            _ctypes.dlsym(_ctypes.dlopen(None, 0), "prctl"))
        pr_set_child_subreaper = 36
        prctl(c_int(pr_set_child_subreaper), c_int(1), c_int(0), c_int(0), c_int(0))
    except (ImportError, OSError, AttributeError):
        pass


def install_guard(root):
    """Adds the audit hook that confines writes to ``root`` and refuses processes, signals, ctypes and sockets."""
    root = os.path.realpath(root)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    allowed_files = {os.devnull}
    realpath, join, fspath = os.path.realpath, os.path.join, os.fsdecode
    refused = {
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
        "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlsym", "ctypes.call_function", "ctypes.cdata",
        "resource.setrlimit", "resource.prlimit", "socket.connect", "socket.bind", "socket.sendto",
    }
    # events whose arguments are (path, ..., dir_fd) or (src, dst, src_dir_fd, dst_dir_fd)
    one_path = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 2, "os.chmod": 2, "os.chown": 3, "os.utime": 3,
                "os.truncate": None, "os.chflags": None, "os.lchflags": None, "os.setxattr": None,
                "os.removexattr": None, "shutil.rmtree": 1}
    two_paths = {"os.rename", "os.link", "os.symlink"}

    def inside(path, dir_fd=None):
        if isinstance(path, int):  # an open file descriptor: opened under the same rules
            return True
        try:
            path = fspath(path)
            if dir_fd is not None and dir_fd >= 0 and not os.path.isabs(path):
                path = join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
            full = realpath(path)
        except (TypeError, ValueError, OSError):
            return False
        return full == root or full.startswith(root + os.sep) or full in allowed_files

    def hook(event, args):
        if event in refused:
            raise PermissionError(f"sandbox: {event} is not allowed here")
        if event == "open":
            path, mode, flags = (list(args) + [None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox's folder is not allowed")
        elif event in one_path:
            where = one_path[event]
            dir_fd = args[where] if where is not None and len(args) > where else None
            if not inside(args[0], dir_fd if isinstance(dir_fd, int) else None):
                raise PermissionError(f"sandbox: {event} on {args[0]!r} outside the sandbox's folder is not allowed")
        elif event in two_paths:
            src_fd = args[2] if len(args) > 2 and isinstance(args[2], int) else None
            dst_fd = args[3] if len(args) > 3 and isinstance(args[3], int) else None
            if event == "os.symlink":  # (src, dst, dir_fd): the link is created at dst; its target may be anywhere
                if not inside(args[1], src_fd):
                    raise PermissionError(f"sandbox: {event} to {args[1]!r} outside the sandbox's folder is not allowed")
            elif not (inside(args[0], src_fd) and inside(args[1], dst_fd)):
                raise PermissionError(f"sandbox: {event} outside the sandbox's folder is not allowed")

    sys.addaudithook(hook)


def _descendants():
    """This process's descendants now (Linux: ``/proc/PID/task/TID/children``); an empty set elsewhere."""
    found, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            for k in kids:
                if k not in found:
                    found.add(k)
                    todo.append(k)
    return found


def end_descendants():
    """Kills and reaps every descendant; as a subreaper this process inherits the orphans, so none escapes."""
    import _signal
    import time

    while True:
        for pid in _descendants():
            try:
                os.kill(pid, _signal.SIGKILL)
            except OSError:
                pass
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
        time.sleep(0.001)


def supervise(pid, config):
    """Waits for the program's process, kills whatever it left behind, and exits as the program did.

    An alarm a little past the parent's timeout ends everything even if the parent (the evaluator)
    died and can no longer kill the program.
    """
    import _signal  # the C module: ``signal`` would import ``enum``, slow to start

    def on_alarm(signum, frame):
        end_descendants()
        os._exit(128 + _signal.SIGKILL)

    _signal.signal(_signal.SIGALRM, on_alarm)
    _signal.alarm(config["backstop_seconds"])
    os.close(config["report_fd"])
    _, status = os.waitpid(pid, 0)
    _signal.alarm(0)
    end_descendants()
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # killed by a signal: end the same way, so the parent sees that signal
        _signal.signal(-code, _signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)


def run(config):
    """Runs the program as a module named ``run_name``; reports "started", then "returned" or "exit"."""
    program = config["program"]
    report_fd = config["report_fd"]
    with open(program, encoding="utf-8") as f:
        source = f.read()
    try:
        code = compile(source, program, "exec")
    except (SyntaxError, ValueError) as e:  # the program's own fault (ValueError: a null byte), as for a script
        os.write(report_fd, b"started ")
        e.__traceback__ = None
        sys.excepthook(type(e), e, None)
        sys.exit(1)
    module = type(sys)(config["run_name"])  # a new module object
    module.__file__ = program
    module.__builtins__ = builtins
    if config["run_name"] == "__main__":
        sys.modules["__main__"] = module
    sys.argv = [program]
    if config["guard"]:
        install_guard(config["folder"])
    os.write(report_fd, b"started ")
    try:
        exec(code, module.__dict__)
    except SystemExit:
        os.write(report_fd, b"exit")
        raise
    except BaseException as e:  # the traceback from the program's own frames, as when run as a script
        e.__traceback__ = e.__traceback__.tb_next
        sys.excepthook(type(e), e, e.__traceback__)
        sys.exit(1)
    os.write(report_fd, b"returned")


def add_site_packages():
    """What ``site`` gives a script, without ``.pth`` hooks: the site-packages folders, ``exit``, ``quit``, ``help``."""
    import site

    for folder in site.getsitepackages():
        if os.path.isdir(folder) and folder not in sys.path:
            sys.path.append(folder)
    site.setquit()
    site.setcopyright()
    site.sethelper()


def main(config):
    """Limits this process, then runs the program in a child process and supervises it (see the docstring)."""
    add_site_packages()
    apply_limits(config)
    become_subreaper()
    pid = os.fork()
    if pid == 0:
        run(config)  # the program's process ends as the program does (exception, exit(), or its end)
    else:
        supervise(pid, config)


if __name__ == "__main__":
    main(marshal.loads(bytes.fromhex(sys.argv[1])))
