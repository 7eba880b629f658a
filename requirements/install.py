"""Install packages into a virtual environment with uv, configured the way pip is on this machine; else with pip.

    python3 requirements/install.py VENV [UV] -- <pip install arguments>

`make setup` calls this for both environments. uv (the `UV` path, installed by `make` with pip) unpacks wheels
several times faster than pip, but it does not read pip's configuration, so the configuration pip would use here
(`pip config list`: /etc/pip.conf, the user's pip.conf, PIP_* variables) is translated into uv's arguments:
index-url, extra-index-url, find-links, constraint, trusted-host, cert and timeout. A setting with no translation
(e.g. `only-binary`), a missing uv, or a uv that fails installs with pip instead, and says why. Both compile
bytecode at install time: where PYTHONDONTWRITEBYTECODE is set (CI machines often set it) nothing is compiled
later, and every process would compile every module it imports, every time (the suite took 1.6x as long).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

# pip settings that change nothing about what gets installed
IGNORED = {"disable-pip-version-check", "no-compile", "compile", "quiet", "verbose", "progress-bar", "no-color",
           "no-cache-dir", "cache-dir", "no-input", "root-user-action", "require-virtualenv", "retries",
           "break-system-packages", "no-python-version-warning"}
REPEATED = {"extra-index-url": "--extra-index-url", "find-links": "--find-links", "constraint": "--constraint",
            "trusted-host": "--allow-insecure-host"}


def pip_config(venv: Path) -> dict[str, str]:
    """`pip config list` as {key: value}, with pip's precedence: PIP_* variables (`:env:.key`) over the files
    (`global.key`, `install.key`, ...)."""
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "config", "list"], capture_output=True,
                         text=True, check=True).stdout
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in out.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        try:
            value = str(ast.literal_eval(value))
        except (ValueError, SyntaxError):
            value = value.strip("'\"")
        (env if section == ":env:" else files)[key] = value
    return {**files, **env}


def uv_arguments(config: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """uv's arguments and environment for pip's configuration; ValueError names a setting uv cannot honour."""
    args: list[str] = []
    env: dict[str, str] = {}
    for key, value in config.items():
        if key in IGNORED:
            continue
        if key in REPEATED:
            for item in value.split():
                args += [REPEATED[key], item]
        elif key == "index-url":
            args += ["--index-url", value]
        elif key == "no-index":
            if value.lower() in ("1", "true", "yes", "on"):
                args.append("--no-index")
        elif key == "cert":
            env["SSL_CERT_FILE"] = value
        elif key in ("timeout", "default-timeout"):
            env["UV_HTTP_TIMEOUT"] = str(int(float(value)))
        else:
            raise ValueError(f"pip setting '{key}' has no uv equivalent here")
    return args, env


def main(argv: list[str]) -> int:
    if "--" not in argv:
        sys.exit(__doc__)
    split = argv.index("--")
    head, pip_args = argv[:split], argv[split + 1:]
    venv = Path(head[0])
    uv = Path(head[1]) if len(head) > 1 else None
    if uv is not None and uv.is_file():
        try:
            args, env = uv_arguments(pip_config(venv))
        except ValueError as exc:
            print(f"install.py: {exc}: installing with pip", file=sys.stderr)
        else:
            # pip takes the best match across all its indexes; uv by default stops at the first index that has the
            # package at all, which fails where a local index holds other versions of it
            command = [str(uv), "pip", "install", "--python", str(venv / "bin" / "python"),
                       "--index-strategy", "unsafe-best-match", "--compile-bytecode", *args, *pip_args]
            if subprocess.run(command, env={**os.environ, **env}).returncode == 0:
                return 0
            print("install.py: uv failed (above): installing with pip", file=sys.stderr)
    elif uv is not None:
        print(f"install.py: no uv at {uv}: installing with pip", file=sys.stderr)
    return subprocess.run([str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", *pip_args]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
