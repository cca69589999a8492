rule evaluate:
    """Perplexity, KL and top-1 agreement with the base model, zero-shot accuracy, KV bytes (analytic and measured)."""
    input:
        checkpoint=f"{RESULTS}/checkpoints/{{model}}/{{method}}/{{budget}}/{{variant}}",
        base="resources/models/{model}",
        data=f"resources/data/{{model}}/{DATA}",
        eval_data="resources/eval_data",
        code=code("evaluate", "metrics", "zeroshot", "modeling", "models"),
    output:
        f"{RESULTS}/metrics/{{model}}/{{method}}/{{budget}}/{{variant}}.json",
    params:
        hydra=lambda wc: hydra("evaluate", f"{wc.model}/{wc.method}/{wc.budget}/{wc.variant}"),
    conda:
        "../../environment.yml"
    log:
        f"{LOGS}/evaluate/{{model}}_{{method}}_{{budget}}_{{variant}}.log",
    resources:
        gpu=1,
    shell:
        "python -m kvshare.evaluate {params.hydra} model={wildcards.model} evaluate.checkpoint={input.checkpoint} "
        "evaluate.base_dir={input.base} evaluate.data_dir={input.data} evaluate.eval_data_dir={input.eval_data} "
        "evaluate.variant={wildcards.variant} "
        "evaluate.out={output} > {log} 2>&1"
