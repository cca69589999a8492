EVALUATE = (
    "python -m kvshare.evaluate {params.hydra} model={wildcards.model} evaluate.checkpoint={input.checkpoint} "
    "evaluate.base_dir={input.base} evaluate.data_dir={input.data} evaluate.eval_data_dir={input.eval_data} "
    "evaluate.variant={params.variant} evaluate.out={output} > {log} 2>&1"
)


rule evaluate:
    """Perplexity, KL and top-1 agreement with the base model, zero-shot accuracy, KV bytes (analytic and measured)."""
    input:
        checkpoint=f"{RESULTS}/checkpoints/{{model}}/{{method}}/{{budget}}/{{variant}}",
        base=base_model,
        data=f"resources/data/{{model}}/{DATA}",
        eval_data="resources/eval_data",
        code=code("evaluate", "metrics", "zeroshot", "modeling", "models"),
    output:
        f"{RESULTS}/metrics/{{model}}/{{method}}/{{budget}}/{{variant}}.json",
    params:
        hydra=lambda wc: hydra("evaluate", f"{wc.model}/{wc.method}/{wc.budget}/{wc.variant}"),
        variant=lambda wc: wc.variant,
    conda:
        "../../environment.yml"
    log:
        f"{LOGS}/evaluate/{{model}}_{{method}}_{{budget}}_{{variant}}.log",
    resources:
        gpu=1,
    shell:
        EVALUATE


rule evaluate_pretrained:
    """The same measures for a model pretrained from scratch in one layout (KL and agreement: to the base layout)."""
    input:
        checkpoint=f"{RESULTS}/pretrained/{{model}}/{{layout}}",
        base=base_model,
        data=f"resources/data/{{model}}/{DATA}",
        eval_data="resources/eval_data",
        code=code("evaluate", "metrics", "zeroshot", "modeling", "models"),
    output:
        f"{RESULTS}/metrics/{{model}}/pretrained/{{layout}}.json",
    params:
        hydra=lambda wc: hydra("evaluate", f"{wc.model}/{wc.layout}/pretrained"),
        variant="pretrained",
    conda:
        "../../environment.yml"
    log:
        f"{LOGS}/evaluate/{{model}}_{{layout}}_pretrained.log",
    resources:
        gpu=1,
    shell:
        EVALUATE
