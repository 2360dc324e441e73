"""`moe.procs` and the local job ids built on it: a reused PID does not make a dead run
look alive."""

from __future__ import annotations

import os
import subprocess
import sys

from moe.procs import process_start_time
from moe.sweeps.scheduler import LOCAL_ALIVE, LOCAL_GONE, job_states, local_job_id


def test_a_reused_pid_is_not_the_recorded_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        recorded = local_job_id(child.pid)
        assert job_states([recorded]) == {recorded: LOCAL_ALIVE}
        # the same record, had the OS given that PID to another live process (this one)
        reused = recorded.replace(f":{child.pid}:", f":{os.getpid()}:")
        assert reused != recorded
        assert job_states([reused]) == {reused: LOCAL_GONE}
    finally:
        child.kill()
        child.wait()
    assert job_states([recorded]) == {recorded: LOCAL_GONE}


def test_start_time_is_field_22_of_proc_stat():
    fields = open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()
    assert process_start_time(os.getpid()) == int(fields[19])  # field 22 = index 19 after ')'
