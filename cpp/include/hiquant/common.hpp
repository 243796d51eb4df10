// Shared types. Matrices crossing the core's API are row-major (C order), as NumPy hands them.
#pragma once
#include <Eigen/Core>
#include <cstdint>

namespace hiquant {

using RowMatrixXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatrixXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MapRowXf = Eigen::Map<RowMatrixXf>;
using MapRowXd = Eigen::Map<RowMatrixXd>;
using CMapRowXf = Eigen::Map<const RowMatrixXf>;
using CMapRowXd = Eigen::Map<const RowMatrixXd>;

}  // namespace hiquant
