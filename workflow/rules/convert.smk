rule convert:
    """Apply the plan to the base model: a checkpoint whose KV cache really shrinks."""
    input:
        model=base_model,
        plan=f"{RESULTS}/plans/{{model}}/{{method}}/{{budget}}.json",
        code=code("convert", "merge", "modeling", "plan", "models"),
    output:
        directory(f"{RESULTS}/checkpoints/{{model}}/{{method}}/{{budget}}/converted"),
    params:
        hydra=lambda wc: hydra("convert", f"{wc.model}/{wc.method}/{wc.budget}"),
    conda:
        "../../environment.yml"
    log:
        f"{LOGS}/convert/{{model}}_{{method}}_{{budget}}.log",
    shell:
        "python -m kvshare.convert {params.hydra} model={wildcards.model} convert.model_dir={input.model} "
        "convert.plan={input.plan} convert.out={output} > {log} 2>&1"
