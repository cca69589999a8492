rule evaluate:
    """Perplexity, KL and top-1 agreement with the base model, KV bytes (analytic and measured)."""
    input:
        checkpoint=f"{RESULTS}/checkpoints/{{model}}/{{method}}/{{budget}}/{{variant}}",
        base="resources/models/{model}",
        data=f"resources/data/{{model}}/{DATA}",
        code=code("evaluate", "metrics", "modeling", "models"),
    output:
        f"{RESULTS}/metrics/{{model}}/{{method}}/{{budget}}/{{variant}}.json",
    params:
        hydra=lambda wc: hydra("evaluate", f"{wc.model}/{wc.method}/{wc.budget}/{wc.variant}"),
    log:
        f"{LOGS}/evaluate/{{model}}_{{method}}_{{budget}}_{{variant}}.log",
    resources:
        gpu=1,
    shell:
        "{PY} -m kvshare.evaluate {params.hydra} model={wildcards.model} evaluate.checkpoint={input.checkpoint} "
        "evaluate.base_dir={input.base} evaluate.data_dir={input.data} evaluate.variant={wildcards.variant} "
        "evaluate.out={output} > {log} 2>&1"
