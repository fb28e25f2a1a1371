"""Reinforcement learning, one module per role (nothing imported here: settings stays torch-free
for the CLI):

    settings.py   GRPOSettings (rl-step's algorithm options) and the prompt order
    loss.py       advantages, TIS weights, k3 KL, PPO-clip loss
    rewards.py    verifiable rewards and exact-match accuracy
    loop.py       GRPOLoop: one iteration = rollout, score, update, weight sync
    session.py    Session: one rl-step run around the loop (optimizer, engine, resume, files)
"""
