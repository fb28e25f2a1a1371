# The seed's three RL arms, one flag apart (sourced by rl-arms.sh and rl-chain.sh):
#   arm_flags ARM   sets the array `flags` to ARM's rl-step flags, or exits 2 on an unknown ARM.
arm_flags() {
  case $1 in
    int4-qat) flags=() ;;                         # fake-INT4 training, INT4 rollouts
    int4-ptq) flags=(--no-fake-quant) ;;          # BF16 training, INT4 (PTQ) rollouts
    bf16)     flags=(--rollout-precision bf16) ;; # BF16 training, BF16 rollouts
    *) echo "${0##*/}: ARM must be int4-qat, int4-ptq or bf16, not '$1'" >&2; exit 2 ;;
  esac
}
