"""`fastgpt bench`: harness (timing, memory, tables, CSV, charts), suites (what each op's
benchmark measures), train_steps (whole training steps) and command (the CLI)."""
