"""What training needs beyond the models and the data: train states, the loop, each phase's
step, CMFT -> CMFF initialisation and CMFF validation."""
