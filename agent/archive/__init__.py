"""``or-agent archive``: replay a hospital's archive of recorded surgeries on a Ray cluster, resumably,
and compare the cases in one cohort report (``sources`` lists the cases, ``run`` replays them, ``report``
aggregates what they wrote)."""
