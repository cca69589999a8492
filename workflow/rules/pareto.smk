METRICS = [
    path("metrics", model=model, method=method, budget=budget, variant=variant)
    for model, method, budget in GRID
    for variant in VARIANTS
] + [
    path("metrics_pretrained", model=model, layout=layout)
    for model in config["models"]
    for layout in (PRETRAIN or {}).get("layouts", [])
]
if config.get("partial"):  # a study cut short: the tables of what was evaluated (run with --allowed-rules pareto)
    METRICS = [m for m in METRICS if os.path.exists(m)]


rule pareto:
    """One table of every variant read back from MLflow, Pareto fronts of quality against KV bytes, plots."""
    input:
        metrics=METRICS,
        code=code("kvshare.pareto", "pareto"),
    output:
        PARETO,
    params:
        hydra=hydra("pareto", STUDY),
        metrics=lambda wc, input: ",".join(input.metrics),
        out_dir=lambda wc, output: os.path.dirname(output[0]),
    conda:
        "../../environment.yml"
    log:
        f"{LOGS}/pareto.log",
    shell:
        "python -m kvshare.pareto {params.hydra} 'pareto.metrics=[{params.metrics}]' "
        "pareto.out_dir={params.out_dir} > {log} 2>&1"
