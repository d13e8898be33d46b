"""The live view's page: read from package data, and a CSP that admits exactly its inline code."""

from __future__ import annotations

import base64
import hashlib
import re
import tomllib
from importlib.resources import files
from pathlib import Path

import pytest

from catflap.api.dashboard_page import CONTENT_SECURITY_POLICY, PAGE, PAGE_FILE

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def test_the_page_is_the_file_beside_the_module_byte_for_byte() -> None:
    assert PAGE.encode() == files("catflap.api").joinpath(PAGE_FILE).read_bytes()
    assert PAGE.startswith("<!doctype html>\n") and PAGE.endswith("</html>\n")


def test_the_page_is_declared_package_data_so_wheels_carry_it() -> None:
    package_data = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-data"]
    assert PAGE_FILE in package_data["catflap.api"]


@pytest.mark.parametrize(("directive", "tag"), [("script-src", "script"), ("style-src", "style")])
def test_the_csp_admits_the_inline_code_by_its_hash(directive: str, tag: str) -> None:
    (inline,) = re.findall(rf"<{tag}>(.*?)</{tag}>", PAGE, flags=re.DOTALL)
    assert f"{directive} '{sha256(inline)}'" in CONTENT_SECURITY_POLICY


def test_the_csp_allows_nothing_else() -> None:
    assert CONTENT_SECURITY_POLICY.startswith("default-src 'none'; ")
    assert (
        "unsafe" not in CONTENT_SECURITY_POLICY and "connect-src 'self'" in CONTENT_SECURITY_POLICY
    )
