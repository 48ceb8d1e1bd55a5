"""Evaluation: Hungarian-matched metrics (``metrics``), datasets
(``datasets``) and the benchmark runner with resume (``runner``)."""
