"""From a launch config to the jobs to submit: the job graph, validation before anything is queued, the plan
against what already ran, evaluation milestones, the experiment folder."""
