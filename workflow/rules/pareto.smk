METRICS = [
    f"{RESULTS}/metrics/{model}/{method}/{budget}/{variant}.json"
    for model, method, budget in GRID
    for variant in VARIANTS
]


rule pareto:
    """One table of every variant read back from MLflow, Pareto fronts of quality against KV bytes, plots."""
    input:
        metrics=METRICS,
        code=code("pareto", "fronts"),
    output:
        PARETO,
    params:
        hydra=hydra("pareto", STUDY),
        model=config["models"][0],
        metrics=lambda wc, input: ",".join(input.metrics),
    log:
        f"{LOGS}/pareto.log",
    shell:
        "{PY} -m kvshare.pareto {params.hydra} model={params.model} 'pareto.metrics=[{params.metrics}]' "
        "pareto.out_dir={RESULTS} > {log} 2>&1"
