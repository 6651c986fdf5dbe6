"""Workloads: everything that differs between a CNN, an RNN and BERT lives here, not in the trainer.

Each module gives the trainer the same few things:

    Recipe                      pydantic model: the common sections plus its own `model` and `data`
    build_model(recipe)         -> torch.nn.Module
    build_data(recipe, device)  -> dltrain.data.DataSplits (train, val, optional test)
    forward(model, batch)       -> Output(loss, stats): the mean loss to backpropagate, and
                                   per-example statistics (e.g. loss, correct) that are summed
    summarize(sums)             -> {"loss": ..., "accuracy": ...} from the summed statistics
                                   (`sums["count"]` is the number of examples)
    batch_size_of(batch)        -> examples in a batch
    flops_per_sample(recipe)    -> analytic training FLOPs per example (forward + backward)
    flops_of(recipe, sums) (optional) -> {"flops": ..., "flops_real": ...}: the training FLOPs of a
                                   logged window from its summed statistics (text: padded and
                                   real-token bases); default flops_per_sample x count
    save_model(model, state_dict, dir, recipe) (optional) -> export in the workload's native format
    write_samples(recipe, out_dir) (optional) -> [paths]: sample inputs with their labels, drawn
                                   or tabulated for `dltrain inspect`
"""

from dltrain.workloads import bert, cnn, rnn

# A plain dict: the name a recipe's `workload:` key takes -> the module implementing it.
WORKLOADS = {
    "cnn": cnn,
    "rnn": rnn,
    "bert": bert,
}
