rule convert:
    """Apply the plan to the base model: a checkpoint whose KV cache really shrinks."""
    input:
        model=base_model,
        plan=path("plan"),
        code=code("kvshare.convert", "convert", "model={model}"),
    output:
        directory(path("checkpoint", variant="converted")),
    params:
        hydra=lambda wc: hydra("convert", f"{wc.model}/{wc.method}/{wc.budget}"),
    conda:
        "../../environment.yml"
    priority: 2  # see search
    log:
        path("log", rule="convert", name="{model}_{method}_{budget}"),
    shell:
        "python -m kvshare.convert {params.hydra} model={wildcards.model} convert.model_dir={input.model} "
        "convert.plan={input.plan} convert.out={output} > {log} 2>&1"
