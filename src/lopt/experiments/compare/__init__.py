"""`lopt compare`: every method on the same model, data, step budgets and seeds. The sweep (sweep) runs every point of
the settings (spec) as `lopt sft` runs (runs), chooses on validation (select), and writes report.md (report) and the
plots (plots); on a real base it also scores the world knowledge kept and the code perplexity (world_knowledge).
"""
