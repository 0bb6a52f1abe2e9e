"""Moved to fastgpt.benchmark, so that the installed `fastgpt bench` has it; kept for scripts."""

from fastgpt.benchmark import cpu_model, environment, format_env, git_sha, summarize  # noqa: F401
