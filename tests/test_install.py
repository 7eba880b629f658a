"""requirements/install.py: uv is given the settings pip has on the machine, or the install goes to pip."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("install", ROOT / "requirements" / "install.py")
install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install)


def test_pips_settings_become_uvs_arguments():
    args, env = install.uv_arguments({
        "index-url": "https://mirror.example/simple", "extra-index-url": "file:///opt/a/simple file:///opt/b/simple",
        "find-links": "/opt/wheels", "constraint": "/etc/xdg/pip/constraints.txt", "trusted-host": "mirror.example",
        "cert": "/etc/ssl/certs/ca-certificates.crt", "default-timeout": "180", "disable-pip-version-check": "1"})
    assert args == ["--index-url", "https://mirror.example/simple",
                    "--extra-index-url", "file:///opt/a/simple", "--extra-index-url", "file:///opt/b/simple",
                    "--find-links", "/opt/wheels", "--constraint", "/etc/xdg/pip/constraints.txt",
                    "--allow-insecure-host", "mirror.example"]
    assert env == {"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt", "UV_HTTP_TIMEOUT": "180"}


def test_a_setting_uv_cannot_honour_is_named():
    with pytest.raises(ValueError, match="pip setting 'only-binary' has no uv equivalent here"):
        install.uv_arguments({"find-links": "/opt/wheels", "only-binary": ":all:"})


def test_pips_variables_win_over_its_files(monkeypatch, tmp_path):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nfind-links = /from/the/file\nextra-index-url = file:///a/simple\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_FIND_LINKS", "/from/the/variable")
    config = install.pip_config(Path(sys.executable).parent.parent)  # this environment's pip, as make calls it
    assert config["find-links"] == "/from/the/variable"
    assert config["extra-index-url"] == "file:///a/simple"


def test_without_uv_the_install_goes_to_pip_and_says_so(capfd):
    venv = Path(sys.executable).parent.parent
    assert install.main([str(venv), "/nonexistent/uv", "--", "--help"]) == 0  # pip's own `install --help`
    out, err = capfd.readouterr()
    assert "install.py: no uv at /nonexistent/uv: installing with pip" in err
    assert "pip install [options] <requirement specifier>" in out
