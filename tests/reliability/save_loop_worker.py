"""Helper process for test_kill_while_saving.py (run as a script, never imported by tests).

Protocol on stdin/stdout, one line each:
  -> "ready"                 after version 0 is saved to the directory given as argv[1]
  <- "<first version>"       fork a child that saves versions first, first + 1, ... until killed
  -> "child <pid>"           the child's pid, for the test to SIGKILL at a random moment
  -> "reaped <status>"       the child's raw wait status, once it is gone

Version v is self-checking: every adapter tensor holds the value v and the config has alpha = v + 1,
so a load that mixes two saves (weights of one, config of another) is detected.
"""

from __future__ import annotations

import os
import sys

import torch

torch.set_num_threads(1)  # no thread pool before fork: the children stay fork-safe

from torch import nn  # noqa: E402

import peftkit  # noqa: E402

WIDTH, RANK = 256, 64


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(4)))


def save_version(model: nn.Module, directory: str, version: int) -> None:
    if peftkit.adapters(model):
        peftkit.delete_adapter(model, "default")
    peftkit.apply_lora(model, r=RANK, alpha=float(version + 1), targets=["re:\\d+"])
    with torch.no_grad():
        for tensor in peftkit.adapter_state_dict(model).values():
            tensor.fill_(float(version))
    peftkit.save_adapter(model, directory)


def main() -> None:
    directory = sys.argv[1]
    model = build()
    save_version(model, directory, 0)
    print("ready", flush=True)
    for line in sys.stdin:
        version = int(line)
        pid = os.fork()
        if pid == 0:  # the child saves until it is killed
            while True:
                save_version(model, directory, version)
                version += 1
        print(f"child {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"reaped {status}", flush=True)


if __name__ == "__main__":
    main()
