"""What users run to measure and validate fastgpt: the accuracy rule, `fastgpt check`, ahead-of-time
GPU compilation and `fastgpt compile-report`, `fastgpt bench`, and the environment record. Only
fastgpt.cli and the tools themselves import this package; the core never does."""
