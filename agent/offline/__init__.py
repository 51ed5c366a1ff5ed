"""The agent's offline jobs: commands that run to completion over files, not the live agent.

Replaying recorded surgeries and writing their reports, the on-site qualification of a box, the
environment check, the quick-start demo and the held-out evaluation of a segmentation model each
start, work through their inputs and exit with a verdict. They are kept out of the live agent's
modules (service, server, fail-safe, display) so that what runs during a case reads on its own;
``or-agent serve`` imports none of them.
"""
