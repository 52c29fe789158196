"""Names of the fields that flow from shards through transforms into models.

Every stage (readers, shard samples, the streaming loader, transforms, models, losses) uses these
constants, never string literals. Shapes use N = atoms in a batch, B = structures, E = directed edges.
Units: positions and cells in Å, energies in eV, forces in eV/Å.
"""

# --- per structure, as stored in a shard sample and as a `Frame` field ---------------------------
SPECIES = "species"            # (N,) int64   atomic numbers Z
POSITIONS = "pos"              # (N, 3) float  Å, Cartesian
CELL = "cell"                  # (B, 3, 3) float  Å, rows are lattice vectors; zeros when not periodic
PBC = "pbc"                    # (B, 3) bool   periodic along each lattice vector
ENERGY = "energy"              # (B,) float   eV, total potential energy
FORCES = "forces"              # (N, 3) float  eV/Å
STRESS = "stress"              # (3, 3) float  eV/Å³ per structure, ASE sign convention (optional label)

# --- graph, added by the streaming loader --------------------------------------------------------
EDGE_INDEX = "edge_index"      # (2, E) int64  [source i, neighbour j]; both directions present
SHIFT_VECTORS = "shift_vectors"  # (E, 3) float  Å; edge vector r_ij = pos[j] - pos[i] + shift
BATCH = "batch"                # (N,) int64   structure index of each atom (torch_geometric convention)
NATOMS = "natoms"              # (B,) int64   atoms per structure

# --- pretext transforms (pretrain) ---------------------------------------------------------------
MASK_FLAG = "mask_flag"        # (N,) int64   1 on the surviving atoms of a masked molecule, else 0
MASK_TARGET = "mask_target"    # (N, 3) float  unit vector atom → deleted H (minimum image); 0 if unflagged
NOISE_TARGET = "noise_target"  # (N, 3) float  Å, the Gaussian displacement added to each atom

# --- model outputs -------------------------------------------------------------------------------
PRED_ENERGY = "pred_energy"    # (B,) float   eV
PRED_FORCES = "pred_forces"    # (N, 3) float  eV/Å (−∂E/∂r for energy-centric models)
PRED_STRESS = "pred_stress"    # (B, 3, 3) float  eV/Å³, (1/V) ∂E/∂ε (ASE sign: negative under compression)
PRED_VIRIAL = "pred_virial"    # (B, 3, 3) float  eV, −∂E/∂ε

# --- bookkeeping carried next to the arrays ------------------------------------------------------
SAMPLE_KEY = "key"             # str   content hash of the sample; WebDataset __key__
SOURCE = "source"              # str   input file the frame came from
FRAME_INDEX = "frame_index"    # int   index of the frame inside its source
DATASET = "dataset"            # str   data set the sample belongs to (its own energy zero: per-data-set E0)

CHEMICAL_SYMBOLS = (
    "X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se "
    "Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy "
    "Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf "
    "Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og"
).split()
MAX_Z = len(CHEMICAL_SYMBOLS) - 1  # 118
