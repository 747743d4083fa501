"""The diffusion side of the recipe: the cosine noise schedule (``schedule``) and the training objective
(``objective``: timestep sampling, noising, eps / v targets, the combined loss). Inference samplers
(``megafusion.inference.sampler``) step with the same schedule."""
