"""Measuring methods against each other: `lopt compare` (compare/), memory and time (bench, its budget race:
bench_race, its tables: bench_report), the saved-bytes meter they share (meter), whether a run fits (plan) and the
model shapes they use (shapes).
"""
