rule finetune:
    """Uptrain a converted checkpoint with the LM loss on the corpus (the same tokens for every variant)."""
    input:
        checkpoint=path("checkpoint", variant="converted"),
        data=path("tokens", data=DATA),
        code=code("kvshare.finetune", "finetune", "scale={scale}"),
    output:
        directory(path("checkpoint", variant="finetuned")),
    params:
        hydra=lambda wc: hydra("finetune", f"{wc.model}/{wc.method}/{wc.budget}", "scale"),
    conda:
        "../../environment.yml"
    # Before evaluations of converted checkpoints, which are shorter: longest jobs first leaves short ones to
    # fill the last slots, where a long one started late would leave the other slots idle at the end.
    priority: 1
    log:
        path("log", rule="finetune", name="{model}_{method}_{budget}"),
    benchmark:
        path("benchmark", rule="finetune", name="{model}_{method}_{budget}")
    resources:
        gpu=1,
    shell:
        "python -m kvshare.finetune {params.hydra} finetune.checkpoint={input.checkpoint} "
        "finetune.data_dir={input.data} finetune.out={output} > {log} 2>&1"
