"""`dltrain bench`: benchmark suites as one pipeline, plan -> run -> measure -> report -> render, with
typed results; `dltrain bench compare` gates on regressions. The modules by stage:

    cli.py        `dltrain bench SUITE | report DIR | compare OLD NEW | comm`, and finish(): report + render
    plan          suite.py      a suite's schema and its jobs, each with its recipe parsed once
                  ttt.py        the record mode (`records:`): each record's seeds and reference as Jobs
    run           runner.py     launch each job (or inprocess.py: inside the harness), one Result per run
                  joblog.py     a launched job's log: a baseline's figures, or its error in one line
    measure       measure.py    FLOPs and the step profile of a real step; peak FLOP/s: dltrain/peaks.py
                  flops.py      FLOPs per entry and the CPU peak around the runs; each Result's MFU
                  comm.py       collectives timed on this host (`dltrain bench comm`)
                  overhead.py   what dltrain runs per step beyond the bare loop (`python -m dltrain.bench.overhead`)
    perfmodel     perfmodel.py  the step model, the alpha-beta fits, both communication cost models
                  scaling.py    the step model checked against measured runs, and GPU projections
    report        result.py     the typed rows: Result (one run), Config (a configuration's runs), Stats, the tables
                  report.py     results aggregated, baselines, overhead, variants, scaling -> Summary (summary.json)
                  records.py    a record's row (RecordRow), its verdict and its table
    render        markdown.py   report.md; markdown_scaling.py its scaling, comm, step-model and projection
                  cells.py      report.md's cells and tables;  plots.py  PNG plots and the W&B summary run
                  compare.py    two summaries, figure by figure: regressions beyond noise
"""
