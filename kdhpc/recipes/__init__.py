"""The three published recipes, one module each: each defines ``RECIPE``, a declaration of its
stages (:class:`kdhpc.recipe.Recipe`) that ``python -m kdhpc.distill``, ``kdhpc.sweep`` and
``kdhpc.teacher.cache`` run through one runner (:func:`kdhpc.recipe.execute`).
"""
